"""The training loop in pieces, one concept a module; :func:`dlm.train.train` is the entry::

    trainer = Trainer(cfg, out, ...)   # set-up: data, model, resume's weights, compile + wrap,
                                       # optimiser, EMA, loader, then resume's rest or a new run folder
    trainer.train():
        while stopping.should_continue(step):
            train_step()               # lr, noise, gradients, clip, AdamW, EMA
            after_step(now)            # log, checkpoint, stop?
        guard.check(step); checkpointer.save(state)

loop.py (Trainer, TrainResult), state.py (TrainState: the counters trainer.pt carries),
step.py (one step's noise seed, learning rate and gradients), setup.py (data, initial
weights, optimiser), compiling.py (train.compile), ema.py, checkpointer.py (resume and
atomic checkpoints, one process or sharded), reporting.py + metrics_log.py (progress bar,
metrics.jsonl, TensorBoard), throughput.py (tokens/s, MFU, compile_s), divergence.py (a
non-finite loss stops the run), stopping.py (steps, time budget, Ctrl-C / SIGTERM).
"""

from dlm.trainer.loop import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult"]
