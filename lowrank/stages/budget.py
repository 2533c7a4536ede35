"""Training steps that fit a time budget: the loop recovery's end-to-end and block-wise passes
share (AdamW, linear warm-up then cosine decay to zero).

Without a fixed step count the loop times its steps and picks the total that fits the seconds
left: on a 2-core CPU a step of a 135M-parameter LM takes seconds, on a GPU milliseconds, so no
fixed count suits both.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

# The total before a step is timed; the first step's time is left out (allocations, lazy init).
PROVISIONAL_STEPS = 30


def steps_to_fit(seconds_left: float, step_seconds: float, done: int) -> int:
    """Total step count when ``done`` steps have run and each further step takes
    ``step_seconds``: as many as fit in ``seconds_left``, never fewer than ``done``."""
    if step_seconds <= 0:
        return done + 1
    return done + max(0, math.floor(seconds_left / step_seconds + 1e-9))  # 1e-9: rounding


def train_steps(params: list[torch.nn.Parameter], step_loss: Callable[[int], torch.Tensor],
                lr: float, steps: int | None, seconds: float,
                on_step: Callable[[int, int, float], None] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Minimize ``step_loss(step)`` over ``params``: ``steps`` steps, or (None) as many as fit in
    ``seconds`` by ``clock``. ``on_step(step, total, loss)`` after each step. Returns the losses."""
    start = clock()
    total = [steps or PROVISIONAL_STEPS]

    def factor(step: int) -> float:
        warmup = max(1, total[0] // 10)
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, total[0])
                                                                     / total[0]))

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    losses: list[float] = []
    timed_from = start
    step = 0
    while step < total[0]:
        loss = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        step += 1
        now = clock()
        if steps is None:
            if step == 1:
                timed_from = now
            else:
                # Re-fitted after every step from the mean step time so far: steps differ
                # (batches of different lengths, a machine that slows down), and a total fixed
                # from the first few left a quarter of the budget unused or overran it.
                step_s = (now - timed_from) / (step - 1)
                total[0] = steps_to_fit(start + seconds - now, step_s, step)
        if on_step:
            on_step(step, total[0], losses[-1])
    return losses
