"""Mutations the contract tests must catch: `python tests/scripts/mutate_contracts.py NAME` patches one
component in-process (nothing on disk changes) and runs tests/test_contracts.py, which must fail.
NAME: process-ignores-fixed | sampler-leaves-a-mask | objective-not-row-additive."""
import sys, torch, pytest
which = sys.argv[1]
if which == "process-ignores-fixed":
    from dlm.processes.masked import MaskedProcess
    def corrupt(self, x0, t, generator, fixed=None):
        a = self.schedule.alpha(t)[:, None]
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
        return torch.where(u < 1.0 - a, torch.full_like(x0, self.mask_id), x0)  # fixed ignored
    MaskedProcess.corrupt = corrupt
elif which == "sampler-leaves-a-mask":
    from dlm.samplers.remdm import ReMDMSampler
    orig = ReMDMSampler.sample
    def sample(self, model, process, given, clean, generator, tc, pad=None):
        x, n = orig(self, model, process, given, clean, generator, tc, pad)
        x = x.clone(); x[:, -1] = process.mask_id
        return x, n
    ReMDMSampler.sample = sample
elif which == "objective-not-row-additive":
    from dlm.objectives.uniform import SDDLM
    orig = SDDLM.__call__
    def call(self, logits, c, where, process):
        s = orig(self, logits, c, where, process)
        s.nats = s.nats + s.nats.sum() * 0.01  # couples rows
        return s
    SDDLM.__call__ = call
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_contracts.py"]))
