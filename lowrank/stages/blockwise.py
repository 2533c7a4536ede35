"""Block-wise distillation: each transformer block of the factored model trained to reproduce
the dense block's output on cached inputs, one block at a time (the blocks are the model's
largest ``nn.ModuleList``, as for sequential statistics).

A block step costs one block's forward and backward, not the whole model's and never the LM
head's (a third of SmolLM2's multiply-adds at 128 tokens), and its target is local, so a few
CPU minutes go further than end-to-end steps. The student's block inputs come from the
already-trained compressed blocks before it (errors propagate and get corrected downstream, as
in sequential calibration); the targets are the dense blocks' outputs on the dense inputs.
The blocks' extra arguments (attention mask, rotary position embeddings) are captured with a
forward pre-hook on the first block, so any architecture whose blocks take the hidden states
first works: LLaMA-style decoders and BERT-style encoders alike. The block helpers here (the
first block's inputs, a block's run, which of its layers share an input, whether a layer's
output is added to the block's as is, the module whose output is a block's) serve compensation
too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..nn.layers import is_transposed
from ..nn.swap import blocks_prefix
from .budget import train_steps

State = tuple[torch.Tensor, tuple, dict]  # a block's hidden-states input, other args, kwargs


class _Captured(Exception):
    """Stops the forward pass once the first block's inputs are captured."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    prefix = blocks_prefix(model)
    if prefix is None:
        raise InputError("block-wise recovery needs a model with transformer blocks (an "
                         "nn.ModuleList); use --recover-mode end-to-end")
    return prefix, model.get_submodule(prefix)


def block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list) -> list[State]:
    """The first block's inputs for each batch (``(inputs, mask)`` pairs), without the cache."""
    from transformers.cache_utils import Cache

    captured: list[State] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        # A block runs many times on the same batch: a KV cache would grow with each call.
        kwargs = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()
                  if k != "hidden_states"}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        args = tuple(None if isinstance(a, Cache) else a for a in args[1:])  # GPT-2: positional
        captured.append((hidden.detach(), args, kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for inputs, _ in batches:
                try:
                    model(**inputs)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, state: State) -> torch.Tensor:
    hidden, args, kwargs = state
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def output_module(block: nn.Module, module: nn.Module, state) -> nn.Module | None:
    """The innermost module around ``module`` whose output is ``block``'s output, or None (BERT's
    BertOutput: the last dense layer, the residual, the LayerNorm): once ``module`` is factored,
    that module on its kept inputs is the block's new output, without running the block again.
    One block pass on ``state`` tells (each candidate called once, its output equal to the
    block's)."""
    around = [m for m in block.modules()
              if m is not block and m is not module and any(c is module for c in m.modules())]
    seen: dict[int, list] = {i: [] for i in range(len(around))}
    handles = [m.register_forward_hook(lambda _m, _args, out, i=i: seen[i].append(out))
               for i, m in enumerate(around)]
    try:
        with torch.no_grad():
            out = run_block(block, state)
    finally:
        for h in handles:
            h.remove()
    for i in reversed(range(len(around))):  # innermost first (modules() lists outer first)
        got = seen[i]
        if len(got) == 1 and isinstance(got[0], torch.Tensor) and got[0].shape == out.shape \
                and torch.equal(got[0], out):
            return around[i]
    return None


def writes_block_output(block: nn.Module, module: nn.Module, state) -> bool:
    """Whether ``module``'s output is added to ``block``'s output as is (the last layer of a
    pre-norm residual branch, LLaMA's down_proj; not BERT's, which a LayerNorm follows): a
    perturbation of it reaches the block's output unchanged."""
    added = {}

    def perturb(m, args, output):
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype)
        added["delta"] = noise * output.pow(2).mean().sqrt()
        return output + added["delta"]

    with torch.no_grad():
        base = run_block(block, state)
        handle = module.register_forward_hook(perturb)
        try:
            change = run_block(block, state) - base
        finally:
            handle.remove()
    delta = added["delta"]
    return change.shape == delta.shape and bool((change - delta).norm() < 1e-2 * delta.norm())


def input_groups(block: nn.Module, modules: dict[str, nn.Module], state) -> list[list[str]]:
    """The weights of ``modules`` (inside ``block``) grouped by the tensor they multiply
    (query/key/value share one, gate/up another), in the order they run."""
    return _grouped(_input_calls(block, modules, state), {n: n for n in modules})


def _input_calls(block: nn.Module, modules: dict[str, nn.Module], state) -> list[tuple[str, int]]:
    """(name, which distinct input tensor) of each call of ``modules`` in one run of ``block``."""
    calls, inputs = [], []

    def hook(name):
        def record(module, args):
            i = next((k for k, x in enumerate(inputs) if x is args[0]), None)
            if i is None:
                i = len(inputs)
                inputs.append(args[0])
            calls.append((name, i))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            run_block(block, state)
    finally:
        for h in handles:
            h.remove()
    return calls


def _grouped(calls: list[tuple[str, int]], names: dict[str, str]) -> list[list[str]]:
    """The groups of :func:`input_groups` for the modules ``names`` maps (to what it returns)."""
    groups: dict[int, list[str]] = {}  # insertion order: the order the groups' tensors are used
    for module, tensor in calls:
        if module in names:
            groups.setdefault(tensor, []).append(names[module])
    return list(groups.values())


class BlockStructure:
    """:func:`input_groups`, :func:`writes_block_output` and :func:`output_module` for the blocks
    of one model. Each runs the block, so they run on the first block of a kind and the answers
    hold for the others, which run the same code (a kind: the block's class and the names of
    its modules; SmolLM2: 30 blocks, ~2.4 s of passes run once). Modules are named by their
    path inside the block."""

    def __init__(self):
        self.answers: dict = {}

    def _answer(self, block: nn.Module, question, compute: Callable):
        key = (type(block), tuple(n for n, _ in block.named_modules()), question)
        if key not in self.answers:
            self.answers[key] = compute()
        return self.answers[key]

    def groups(self, block: nn.Module, paths: dict[str, str], state) -> list[list[str]]:
        """:func:`input_groups` of the modules at ``paths`` ({name: path}), by name."""
        calls = self._answer(block, "inputs", lambda: _input_calls(
            block, {p: m for p, m in block.named_modules()
                    if isinstance(m, nn.Linear) or is_transposed(m)}, state))
        return _grouped(calls, {p: n for n, p in paths.items()})

    def writes_output(self, block: nn.Module, path: str, state) -> bool:
        return self._answer(block, ("writes", path), lambda: writes_block_output(
            block, block.get_submodule(path), state))

    def output_module(self, block: nn.Module, path: str, state) -> nn.Module | None:
        def find():
            found = output_module(block, block.get_submodule(path), state)
            return next((p for p, m in block.named_modules() if m is found), None)
        found = self._answer(block, ("output", path), find)
        return None if found is None else block.get_submodule(found)


class FinishedOutputs:
    """Outputs of ``block``'s modules kept from one pass over its batches (``states``) and
    returned in later passes on the same inputs instead of computed again. Compensation's pass
    for a group of layers stops at the group's first layer, and groups are fitted in the order
    they run: a module that finished before that point and holds none of the layers still to
    fit got its inputs from fitted or never-fitted layers only, so its output cannot change
    until the block is done. SmolLM2's gate/up pass then skips q/k/v and its block-output pass
    the whole attention, with the same factors bit for bit (tests/test_compensate.py). Not
    reused: a module called twice on one batch, an output changed in place after it was kept.
    """

    def __init__(self, block: nn.Module, states: list[State]):
        self.block = block
        self.batch_of = {id(state[0]): i for i, state in enumerate(states)}
        self.batch: int | None = None  # which of ``states`` the block is running on
        self.kept: dict[nn.Module, dict[int, tuple]] = {}  # {batch: (output, its versions)}
        self.twice: set[nn.Module] = set()

    @contextlib.contextmanager
    def reusing(self, pending: list[nn.Module], keep: bool = True):
        """One pass: the modules kept so far return their outputs; with ``keep``, modules that
        finish and hold none of ``pending`` (the layers still to fit) are kept."""
        handles = [self.block.register_forward_pre_hook(self._which_batch)]
        patched = list(self.kept)
        for module in patched:
            module.forward = self._reused(module, module.forward)
        if keep:
            pending_ids = {id(m) for m in pending}
            handles += [m.register_forward_hook(self._keep) for m in self.block.modules()
                        if m is not self.block and m not in self.kept and m not in self.twice
                        and not any(id(d) in pending_ids for d in m.modules())]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module in patched:
                del module.forward
            for module in list(self.kept):  # an outer module's output makes its parts' moot
                for part in module.modules():
                    if part is not module:
                        self.kept.pop(part, None)

    def _which_batch(self, block, args):
        self.batch = self.batch_of.get(id(args[0])) if args else None

    def _keep(self, module, args, output):
        if self.batch is None or module in self.twice:
            return
        outputs = self.kept.setdefault(module, {})
        if self.batch in outputs:  # which call would a later pass be asking for?
            self.twice.add(module)
            del self.kept[module]
            return
        outputs[self.batch] = (output, _versions(output))

    def _reused(self, module: nn.Module, compute: Callable):
        def forward(*args, **kwargs):
            got = self.kept[module].get(self.batch) if self.batch is not None else None
            if got is not None and _versions(got[0]) == got[1]:
                return got[0]
            return compute(*args, **kwargs)
        return forward


def _versions(output) -> tuple:
    """The in-place version counters of the tensors in ``output`` (a tensor or a tuple)."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    return tuple(t._version if isinstance(t, torch.Tensor) else None for t in items)


def block_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None):
    """MSE over real tokens, normalized by the teacher's mean square (comparable across blocks)."""
    if mask is not None:
        student, teacher = student[mask], teacher[mask]
    student, teacher = student.float(), teacher.float()
    return (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp(min=1e-12)


@dataclass
class BlockRecord:
    name: str
    steps: int
    loss_before: float  # the block's distillation loss on its first cached batch
    loss_after: float

    def to_json(self) -> dict:
        return {"block": self.name, "steps": self.steps,
                "loss_before": round(self.loss_before, 6), "loss_after": round(self.loss_after, 6)}


def train_block(name: str, block: nn.Module, states: list[State], targets: list[torch.Tensor],
                masks: list, params: list[nn.Parameter], lr: float, steps: int | None,
                seconds: float, on_step, clock) -> BlockRecord:
    """Train ``params`` (inside ``block``) so the block maps ``states`` to ``targets``."""
    def step_loss(step: int) -> torch.Tensor:
        j = step % len(targets)
        return block_loss(run_block(block, states[j]), targets[j], masks[j])

    def first_loss() -> float:
        with torch.no_grad():
            return float(step_loss(0))

    before = first_loss()
    losses = train_steps(params, step_loss, lr, steps, seconds, on_step, clock) if params else []
    return BlockRecord(name, len(losses), before, first_loss())


def blockwise_distill(student: nn.Module, teacher: nn.Module, batches: list,
                      trainable: list[nn.Parameter], lr: float, *, seconds: float,
                      steps: int | None = None,
                      on_step: Callable[[int, int, int, int, float], None] | None = None,
                      clock: Callable[[], float] = time.perf_counter) -> list[BlockRecord]:
    """Train ``student``'s blocks in turn to match ``teacher``'s on ``batches`` (``(inputs,
    mask)`` pairs): only the ``trainable`` parameters inside each block, ``steps`` steps per
    block or (None) an equal share of ``seconds`` each; ``on_step(block, blocks, step, total,
    loss)`` after each step. Returns each block's losses."""
    start = clock()
    prefix, student_blocks = find_blocks(student)
    teacher_blocks = teacher.get_submodule(prefix)
    teacher_states = block_inputs(teacher, teacher_blocks, batches)
    student_states = block_inputs(student, student_blocks, batches)
    masks = [mask for _, mask in batches]
    wanted = {id(p) for p in trainable}
    records = []
    for i, (teacher_block, student_block) in enumerate(zip(teacher_blocks, student_blocks)):
        with torch.no_grad():
            targets = [run_block(teacher_block, s) for s in teacher_states]
        params = [p for p in student_block.parameters() if id(p) in wanted]
        left = start + seconds * (i + 1) / len(student_blocks) - clock()
        report = (lambda step, total, loss, i=i: on_step(i, len(student_blocks), step, total,
                                                          loss)) if on_step else None
        records.append(train_block(f"{prefix}.{i}", student_block, student_states, targets,
                                   masks, params, lr, steps, max(left, 0.0), report, clock))
        with torch.no_grad():  # the next block's inputs: this block as trained, and the dense one
            student_states = [(run_block(student_block, s), s[1], s[2]) for s in student_states]
        teacher_states = [(y, s[1], s[2]) for y, s in zip(targets, teacher_states)]
    return records
