"""Compensation (the default with calibration): each layer's factors fitted to the *dense*
layer's outputs from the inputs it gets in the partly factored model (a least-squares target,
not only the re-weighting of :mod:`lowrank.stages.sequential`), on cached block inputs, so it
costs a few model forwards in all. A block's last layer, when its output is added to the
block's output as is, is fitted to a share of the block output's error too."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from ..device import cpu_autocast
from ..errors import InputError
from ..io.samples import model_batches
from ..linalg import lower_gram, matrix_view, symmetric
from ..models import Models, checkpoint_renamer
from ..naming import IN_PROJ, RECURRENT, module_name, split_owner
from ..nn.layers import is_transposed
from ..nn.swap import blocks_prefix, swap_lowrank_
from ..weighting import Weighting
from .calibrate import ActivationStats
from .calibration_text import calibration_data
from .recorder import FLUSH_ROWS, token_rows
from .sequential import input_features

# "auto" (damping, residual share, share of the calibration file's lines fitted on), by the
# calibration text (reports/compensation.md). A causal LM's text topped up with sampled text is
# the model's own distribution: the fits need less of the ridge that guards a narrow text's
# blind spots and absorb more of the block output's error (SmolLM2 85%, python_docs perplexity
# / dense 1.428x -> 1.403x; 70% 2.514x -> 2.339x), and run on every other line of the file with
# all the sampled ones, which gives the model's own text more weight (85%: 1.393x -> 1.376x,
# means of three top-up draws; 70% 2.440x -> 2.354x; held-out Debian KL 0.151 -> 0.160) in a
# third less time. On the file's lines alone the first two trade python_docs for Debian
# (1.467x -> 1.495x): 0.3 / 0.3 there. Encoders (never topped up) gain from damping 0.1 on both
# texts (MiniLM 50%: python_docs cosine 0.779 -> 0.791, Debian 0.906 -> 0.917).
COMPENSATION_AUTO = {"topped up": (0.1, 0.6, 0.5), "causal LM": (0.3, 0.3, 1.0),
                     "other": (0.1, 0.3, 1.0)}


def calibration_kind(stats: ActivationStats | None) -> str:
    """Which COMPENSATION_AUTO entry ``stats`` get: statistics saved before they kept the model's
    kind count as a causal LM's (the rule they were made under)."""
    if stats is not None and stats.sampled_lines:
        return "topped up"
    return "other" if stats is not None and stats.causal_lm is False else "causal LM"


def resolve_compensation(damping, share, lines, stats: ActivationStats | None) -> tuple:
    """(damping, residual share, lines) for calibration ``stats``: "auto" by COMPENSATION_AUTO."""
    auto = COMPENSATION_AUTO[calibration_kind(stats)]
    return tuple(a if v == "auto" else v for v, a in zip((damping, share, lines), auto))


def check_compensation(damping, share, lines) -> None:
    """A one-line InputError for a compensation setting out of range (FactorizeSettings)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if damping != "auto" and not (number(damping) and damping >= 0):
        raise InputError(f"factorize compensate_damping must be auto or a number >= 0, "
                         f"got {damping!r}")
    if share not in (None, "auto") and not (number(share) and 0 <= share <= 1):
        raise InputError(f"factorize compensate_residual_share must be auto, null or a "
                         f"number from 0 to 1, got {share!r}")
    if lines != "auto" and not (number(lines) and 0 < lines <= 1):
        raise InputError(f"factorize compensate_lines must be auto or a number above 0 and at "
                         f"most 1, got {lines!r}")


def compensated_targets(weights: list[torch.Tensor], gram: torch.Tensor,
                        products: list[torch.Tensor],
                        damping: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The matrices to truncate, and their whitening, for factors that map the *compressed*
    model's inputs x̃ to the *dense* layers' outputs W·x (``weights``: the (out, in) matrices
    that multiply one input; ``products``: each one's Σ (W x) x̃ᵀ).

    Σ‖W x − M x̃‖² + λ‖M − W‖² (λ = ``damping`` × mean eigenvalue of G̃; the ridge pulls M toward
    W where the calibration inputs say little) is ‖(M − M*)·G'^½‖² + const with
    G' = G̃ + λI, M* = (Σ (W x) x̃ᵀ + λW)·G'⁻¹ and G̃ = Σ x̃ x̃ᵀ; so the best rank-r M is
    M* truncated in G'^½'s metric: data-aware factorization of M* with whitening G'^½. When
    x̃ = x, M* = W and this is plain whitening. Returns ([M*] in the weights' dtype, a root of G');
    float64 maths. Whitening needs any root of G' (:func:`lowrank.weighting.psd_root`): its
    Cholesky factor, already at hand.
    """
    g_reg = gram.double().clone()
    lam = damping * float(g_reg.diagonal().mean())
    g_reg.diagonal().add_(lam)
    cholesky = torch.linalg.cholesky(g_reg)
    targets = []
    for w, product in zip(weights, products):
        rhs = product.double() + lam * w.double()
        # G' is symmetric: M* = (G'⁻¹·rhsᵀ)ᵀ
        targets.append(torch.cholesky_solve(rhs.T, cholesky).T.to(w.dtype))
    return targets, cholesky


class _Reached(Exception):
    """Stops a block's forward pass once the hooked layer's input has been used."""


class _ChunkedSums:
    """Σ x xᵀ and Σ t xᵀ over paired rows (x, t): each batch's float32 products (the Gram's lower
    block triangle, :func:`lowrank.linalg.lower_gram`) summed in float32 and moved into float64
    sums every ``FLUSH_ROWS`` rows, as calibration's Grams are (float64 additions per batch cost
    more than the GEMMs, 18 s of SmolLM2's factorize; joining batches into chunks first cost
    copies, MiniLM's torch.cat 0.6 s)."""

    def __init__(self):
        self.rows = 0
        self.lower: torch.Tensor | None = None  # float32 running sums since the last flush
        self.cross32: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None

    def add(self, x: torch.Tensor, t: torch.Tensor) -> None:
        if self.lower is None:
            self.lower = x.new_zeros(x.shape[1], x.shape[1])
            self.cross32 = x.new_zeros(t.shape[1], x.shape[1])
        lower_gram(x, self.lower, accumulate=True)
        self.cross32.addmm_(t.T, x)
        self.rows += len(x)
        if self.rows >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        gram, cross = symmetric(self.lower).double(), self.cross32.double()
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross
        self.lower.zero_()
        self.cross32.zero_()
        self.rows = 0

    def totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ x xᵀ, Σ t xᵀ) over every row added."""
        self._flush()
        return self.gram, self.cross


class _PairedInputs:
    """What compensation needs of each input-sharing group (keyed by its first weight), from
    the dense block and the partly factored one. In the dense block, hooks keep every batch's
    (real-token) inputs x, or, when the group's outputs are narrower than its input (an FFN's
    down projection), the outputs W·x themselves, bias removed. In the partly factored block the
    first layer keeps x̃ and stops the pass (nothing after it is needed). :meth:`sums` gives the
    group's G̃ = Σ x̃x̃ᵀ and each weight's Σ (W x) x̃ᵀ (:class:`_ChunkedSums`); with the inputs
    kept, via Σ x x̃ᵀ (in × in), with the outputs directly (out × in: the cheaper product when
    out < in)."""

    def __init__(self, groups: dict[str, list[tuple[nn.Module, torch.Tensor]]]):
        """``groups``: {first weight's name: [(dense module, its (out, in) weight)] in order}."""
        self.mask, self.batch = None, 0
        self.weights = {n: [w for _, w in group] for n, group in groups.items()}
        self.keeps_outputs = {n: sum(w.shape[0] for w in ws) < ws[0].shape[1]
                              for n, ws in self.weights.items()}
        self.dense: dict[str, list] = {}
        self.chunked: dict[str, _ChunkedSums] = {}
        self.handles = []
        for name, group in groups.items():
            modules = [m for m, _ in group]
            if self.keeps_outputs[name]:  # one list of outputs per layer, joined per batch
                self.dense[name] = [[] for _ in modules]
                self.handles += [m.register_forward_hook(self._keep_output(name, i))
                                 for i, m in enumerate(modules)]
            else:
                self.dense[name] = []
                self.handles.append(modules[0].register_forward_pre_hook(self._keep_input(name)))

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return token_rows(x.detach(), self.mask).float()

    def _keep_input(self, name):
        def hook(module, args):
            self.dense[name].append(self._rows(args[0]))
        return hook

    def _keep_output(self, name, i):
        def hook(module, args, output):
            bias = getattr(module, "bias", None)
            self.dense[name][i].append(self._rows(output if bias is None else output - bias))
        return hook

    def _dense_rows(self, name: str) -> torch.Tensor:
        if self.keeps_outputs[name]:
            return torch.cat([outputs[self.batch] for outputs in self.dense[name]], dim=1)
        return self.dense[name][self.batch]

    def student(self, name: str, module: nn.Module):
        """Hook ``module`` of the partly factored block; returns the handle."""
        def hook(module, args):
            sums = self.chunked.setdefault(name, _ChunkedSums())
            sums.add(self._rows(args[0]), self._dense_rows(name))
            raise _Reached
        return module.register_forward_pre_hook(hook)

    def sums(self, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(G̃, [Σ (W x) x̃ᵀ for each weight W]) of the group whose first weight is ``name``;
        forgets them and the group's dense rows."""
        self.dense.pop(name)
        weights = self.weights.pop(name)
        gram, cross = self.chunked.pop(name).totals()
        if self.keeps_outputs[name]:
            return gram, list(cross.split([w.shape[0] for w in weights]))
        return gram, [w.double() @ cross for w in weights]  # cross = Σ x x̃ᵀ

    def remove(self):
        for h in self.handles:
            h.remove()


def block_output_sums(block: nn.Module, module: nn.Module, weight: torch.Tensor,
                      states: list, targets: list[torch.Tensor], masks: list,
                      share: float, kept: list | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """G̃ = Σ w x̃x̃ᵀ and Σ w·t x̃ᵀ for the block's last layer
    (:func:`~lowrank.stages.blockwise.writes_block_output`), fitted to t = W x̃ + share·(y − ỹ):
    y the dense block's output (``targets``), ỹ the partly factored block's with this layer
    still W, so with share 1 the layer absorbs all of the block output's error that its inputs
    can predict, upstream blocks' included; less, because that fit sees the calibration tokens
    only (share measured with 256 Debian lines). Each token is weighted by w = 1/mean(y²): the
    next RMSNorm divides by it, and without it a few attention-sink tokens with 100× the norm
    hold half the error. float64 sums of float32 products. ``kept``: a list to which each
    batch's (block output, layer input) is appended."""
    from .blockwise import run_block

    inputs = {}

    def keep(m, args):
        inputs["x"] = args[0]

    sums = _ChunkedSums()
    handle = module.register_forward_pre_hook(keep)
    try:
        for state, y, mask in zip(states, targets, masks):
            output = run_block(block, state)
            error = output - y
            if kept is not None:
                kept.append((output, inputs["x"]))
            root_w = token_rows(y, mask).float().pow(2).mean(dim=1).rsqrt()[:, None]
            sums.add(token_rows(inputs["x"], mask).float() * root_w,
                     token_rows(error, mask).float() * root_w)
    finally:
        handle.remove()
    gram, error_cross = sums.totals()
    return gram, weight.double() @ gram - share * error_cross


def compensated_factors(models: Models, ranks: dict[str, int], stats: ActivationStats,
                        factor: Callable, damping: float | str = "auto",
                        residual_share: float | str | None = "auto",
                        lines: float | str = "auto",
                        dtype: torch.dtype = torch.float32) -> dict:
    """Factor the weights in ``ranks`` in execution order, each fitted to the dense model's
    outputs from the inputs it gets in the model factored so far (:func:`compensated_targets`):
    errors from upstream layers are corrected, not only re-weighted. Works on cached block
    inputs (a few model forwards in all): per transformer block, each group of weights that
    share an input runs the dense block on the dense inputs and the partly factored block on
    the compressed ones. A block's last layer, when its output goes to the block's output as
    is, is fitted to the block's output instead (:func:`block_output_sums`, ``residual_share``;
    None: like the others); when a module around it outputs the block's output (BERT's
    BertOutput), the block's new outputs are that module's, on its inputs kept from the last
    group's pass. The fits run on a share ``lines`` of the calibration file's lines (evenly
    spread) and on every sampled one. "auto" ``damping``, ``residual_share`` and ``lines``:
    :func:`resolve_compensation`. The block passes autocast to ``dtype`` (CPU). Other weights
    (embeddings, an LM head, anything not a Linear) are factored first, from the dense
    statistics. A model without blocks, an encoder-decoder, one with recurrent or attention
    ``in_proj`` weights, or statistics for another data method than ``whiten`` get {} (plain
    factors). ``factor(name, weighting, matrix)`` factors one weight (``matrix``: the target in
    (out, in) form); returns {name: (A, B, result)}."""
    from .blockwise import BlockStructure, FinishedOutputs, block_inputs, run_block

    if stats.settings.method != "whiten":  # kfac/scale weightings are not least squares
        return {}
    damping, residual_share, lines = resolve_compensation(damping, residual_share, lines, stats)
    model, tokenizer, data = calibration_data(models, stats.settings, warn=False,
                                              sampled=stats.sampled_lines, file_share=lines)
    prefix = blocks_prefix(model)
    if prefix is None or getattr(getattr(model, "config", None), "is_encoder_decoder", False) \
            or any(RECURRENT.match(split_owner(n)[1]) or split_owner(n)[1] == IN_PROJ
                   for n in ranks):
        return {}  # no blocks to cache inputs of, two stacks, or a recurrence: plain factors
    blocks = model.get_submodule(prefix)
    batches = list(model_batches(data, tokenizer, stats.settings.batch_size,
                                 stats.settings.max_length, by_length=True))
    masks = [mask for _, mask in batches]
    results = {}

    rename = checkpoint_renamer(model)  # checkpoint key -> the model's (transformers 5)
    known = {n for n, _ in model.named_parameters(remove_duplicate=False)}

    def put(name, A, B, result):
        if rename(name, known) in known:  # else the model never uses it: nothing to swap
            fqn = module_name(rename(name, known))
            swap_lowrank_(model, {fqn: A.shape[1]}, {fqn: (A, B)},
                          {fqn: result.split} if result.split else None)
        results[name] = (A, B, result)

    bf16 = dtype == torch.bfloat16  # recorded in each layer's method

    def factor_group(group, weights, gram, products, method=""):
        matrices, root = compensated_targets(weights, gram, products, damping)
        for name, matrix in zip(group, matrices):
            A, B, result = factor(name, Weighting("whiten", root), matrix)
            result.method += "+compensated" + method + ("+bf16" if bf16 else "")
            put(name, A, B, result)

    dense_states = block_inputs(model, blocks, batches)
    inside: dict[int, list[str]] = {}
    for name in ranks:
        owner, param = split_owner(name)
        module = model.get_submodule(owner) if name in known else None
        if name.startswith(prefix + ".") and param == "weight" \
                and (name in stats.grams or name in stats.output_grams) \
                and (isinstance(module, nn.Linear) or is_transposed(module)):
            inside.setdefault(int(name[len(prefix) + 1:].split(".")[0]), []).append(name)
        else:  # outside the blocks, or not a Linear: from the dense statistics, first
            features = input_features(models, stats, name)
            put(name, *factor(name, stats.weighting(name, features), None))
    student_states = block_inputs(model, blocks, batches) if results else dense_states
    structure = BlockStructure()
    for i, block in enumerate(blocks):
        names = inside.get(i, [])
        dense_block = copy.deepcopy(block) if names else block
        path = (lambda n, i=i: module_name(n)[len(f"{prefix}.{i}."):])  # inside the block
        sub = (lambda root, n, path=path: root.get_submodule(path(n)))
        groups = structure.groups(dense_block, {n: path(n) for n in names},
                                  dense_states[0]) if names else []
        last_layer = groups[-1] if residual_share is not None and groups \
            and len(groups[-1]) == 1 \
            and structure.writes_output(block, path(groups[-1][0]), student_states[0]) \
            else None
        # Else the module whose output is the block's, fed the last group's kept inputs
        tail = structure.output_module(block, path(groups[-1][0]), student_states[0]) \
            if groups and last_layer is None else None
        weights = {n: matrix_view(models.checkpoint.get(n), n in stats.transposed)
                   for g in groups for n in g}
        paired = _PairedInputs({g[0]: [(sub(dense_block, n), weights[n]) for n in g]
                                for g in groups if g is not last_layer})
        with torch.no_grad(), cpu_autocast(dtype):
            try:  # the dense block's outputs and the inputs of its layers, one pass
                targets, outputs = [], None
                for state, paired.mask in zip(dense_states, masks):
                    targets.append(run_block(dense_block, state))
                finished = FinishedOutputs(block, student_states)
                for k, group in enumerate(groups):
                    pending = [sub(block, n) for g in groups[k:] for n in g]
                    if group is last_layer:  # fitted to W x̃ plus a share of the block's error
                        kept = []
                        with finished.reusing(pending, keep=False):
                            gram, product = block_output_sums(
                                block, pending[0], weights[group[0]], student_states, targets,
                                masks, residual_share, kept)
                        factor_group(group, [weights[group[0]]], gram, [product], "+residual")
                        # Its output reaches the block's output as is: the factored block's
                        # outputs are the pass's plus this layer's change, no rerun.
                        factored, dense = sub(block, group[0]), sub(dense_block, group[0])
                        outputs = [y - dense(x) + factored(x) for y, x in kept]
                        continue
                    handles = [paired.student(group[0], pending[0])]
                    tail_inputs = []
                    if tail is not None and group is groups[-1]:
                        handles.append(tail.register_forward_pre_hook(
                            lambda m, args, kwargs, kept=tail_inputs: kept.append((args, kwargs)),
                            with_kwargs=True))
                    # No later pass when the tail module gives the block's outputs
                    with finished.reusing(pending, keep=group is not groups[-1] or tail is None):
                        for paired.batch, (state, paired.mask) in enumerate(zip(student_states,
                                                                                   masks)):
                            try:
                                run_block(block, state)
                            except _Reached:
                                pass
                    for handle in handles:
                        handle.remove()
                    factor_group(group, [weights[n] for n in group], *paired.sums(group[0]))
                    if tail_inputs:  # the factored layer is in place: the block's outputs
                        outputs = [tail(*args, **kwargs) for args, kwargs in tail_inputs]
            finally:
                paired.remove()
            if outputs is None:
                with finished.reusing([], keep=False):
                    outputs = [run_block(block, s) for s in student_states]
            student_states = [(y, s[1], s[2]) for y, s in zip(outputs, student_states)]
        dense_states = [(y, s[1], s[2]) for y, s in zip(targets, dense_states)]
    return results
