"""Few-step students by distillation (``dlm distill``).

``settings`` (the run config's ``distill:`` section, a leaf), ``methods`` (SDTT for masked
diffusion, Duo's DCD for uniform-state diffusion: objectives whose score also calls a frozen
teacher; the divergences), ``trainer`` (the training loop with a teacher that each round
hands over to the student). The service entry is :mod:`dlm.service.distillation`. This
package's own module imports nothing, so each submodule sits in its own layer.
"""
