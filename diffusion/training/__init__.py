"""Training: `train(config, workdir) -> TrainState` and its pieces.

Modules: `step` (the compiled train step of Algorithm 1), `t_sampler` (how t is drawn: uniform
or importance-sampled, Improved DDPM Sec. 3.3), `restore` (where a run starts), `hooks` (log,
checkpoint, sample grid, preemption, storage errors), `loop` (compile, the step loop, `train`).
"""

from diffusion.training.hooks import NonFiniteError
from diffusion.training.loop import train
from diffusion.training.restore import ResumeMismatchError
from diffusion.training.step import make_train_step

__all__ = ["train", "make_train_step", "NonFiniteError", "ResumeMismatchError"]
