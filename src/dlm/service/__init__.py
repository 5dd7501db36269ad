"""What ``dlm train | eval | sample`` do, as functions a library user (and ``dlm.bench``) can
call on a run; ``dlm.cli`` only parses the command line, calls them and prints.

* ``training``: the config a run starts from — ``asked_settings``, ``resume_config``
  (``RESUMABLE`` keys only), ``init_from_config`` (fine-tuning), ``flatten``.
* ``sampling``: ``sampler_settings``, ``generate`` (unconditional / prompted),
  ``sample_given`` (fill what a clean mask leaves open), ``infill`` (templates),
  ``sample_run`` (``dlm sample``), ``answer_text``.
* ``evaluation``: ``configure_bound``, ``evaluate_data`` / ``evaluate_run`` (likelihood),
  ``score_samples`` / ``sample_quality`` (Gen PPL, entropy), ``answer_rows`` /
  ``answer_quality`` (exact match, token accuracy), ``run_summary``.

Layering: service sits above runs, evaluate and train, below ``dlm.bench`` and ``dlm.cli``.
"""

from dlm.service.evaluation import (answer_quality, answer_rows, configure_bound, evaluate_data, evaluate_run,
                                    run_summary, sample_quality, score_samples)
from dlm.service.sampling import answer_text, generate, infill, sample_given, sample_run, sampler_settings
from dlm.service.training import RESUMABLE, asked_settings, flatten, init_from_config, resume_config

__all__ = [
    "RESUMABLE", "answer_quality", "answer_rows", "answer_text", "asked_settings", "configure_bound", "evaluate_data",
    "evaluate_run", "flatten", "generate", "infill", "init_from_config", "resume_config", "run_summary",
    "sample_given", "sample_quality", "sample_run", "sampler_settings", "score_samples",
]
