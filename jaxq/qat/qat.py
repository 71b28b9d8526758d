"""Quantization-aware training shaped like optax: ``init`` / ``apply`` / ``convert``.

``QAT(...)`` holds the same quantizer fields as :class:`~jaxq.quant.rtn.RTN` (``where=``,
``overrides=``, bits, group size, symmetric, format) plus an estimator. Its state mirrors the
params tree: a :class:`QuantizerState` at each selected leaf (``None`` elsewhere) holding the
grid (scales, offsets, learned clip ratios) and the input-axis transforms a PTQ result may
carry (act-order permutation, AWQ input scales). The latent float weights stay in ``params``;
``apply`` fake-quantizes them inside any loss, ``convert`` packs the very codes and scales the
forward pass used into :class:`~jaxq.core.qarray.QArray` leaves.

The fake-quant forward calls the QArray's own code rounding and registered decoder, then undoes
the input transforms and casts exactly as ``QArray.materialize`` does, so ``convert`` is
bit-identical to what training saw.

Layering: QAT uses the code functions of the float formats (``jaxq.quant.float_formats``) and
RTN as its initial grid, so ``jaxq.qat`` imports ``jaxq.quant`` (never the reverse).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxq.core import formats, packing
from jaxq.core import leaf as leaf_lib
from jaxq.core.qarray import QArray, undo_input_transforms
from jaxq.core.transform import LeafTransform, Stats, infer_input_axis
from jaxq.core.tree import flatten_with_paths
from jaxq.qat import estimators as est
from jaxq.qat.act import ActQuant
from jaxq.quant import float_formats as ff
from jaxq.quant.rtn import rtn_quantize

#: Formats QAT can train and convert (their codes and decoders are QArray's).
FORMATS = ("affine", "nf4", "fp8_e4m3", "fp8_e5m2", "mxfp4", "mxfp8")
ESTIMATORS = ("ste", "clipped_ste", "lsq", "lsq+")
_MX_ELEM_MAX = {"mxfp4": 6.0, "mxfp8": 448.0}


@dataclasses.dataclass(frozen=True)
class QuantizerState:
    """The grid of one fake-quantized leaf (a pytree: array fields are children).

    Attributes:
      scale: float32 ``[*rest, n_groups]`` (E8M0 uint8 codes for MX); None with ``clip``.
      bias: affine offset (float32), None for formats without one. With ``"lsq"`` it is the
        offset at ``scale0`` (frozen): the offset moves with the step, keeping the zero point.
      scale0: ``"lsq"`` only: the step at init (frozen).
      clip: learned clip ratio per group (``learn_clip``): the grid is the min-max grid of the
        current latent weights shrunk by it, recomputed every step.
      perm, input_scale: the PTQ leaf's input-axis transforms (frozen), as in QArray.
      Static: fmt, bits, group_size, size, axis (negative), dtype (of the forward's output),
      scale_dtype (stored scales), estimator, symmetric, act_bits (None: weight-only).
    """

    scale: jax.Array | None
    bias: jax.Array | None
    scale0: jax.Array | None
    clip: jax.Array | None
    perm: jax.Array | None
    input_scale: jax.Array | None
    fmt: str
    bits: int
    group_size: int
    size: int
    axis: int
    dtype: Any
    scale_dtype: Any
    estimator: str
    symmetric: bool
    act_bits: int | None = None

    def trainable_fields(self) -> tuple[str, ...]:
        """Children an optimizer updates (the rest is frozen)."""
        if self.clip is not None:
            return ("clip",)
        return {"lsq": ("scale",), "lsq+": ("scale", "bias")}.get(self.estimator, ())


_CHILDREN = ["scale", "bias", "scale0", "clip", "perm", "input_scale"]
jax.tree_util.register_dataclass(
    QuantizerState, data_fields=_CHILDREN,
    meta_fields=[f.name for f in dataclasses.fields(QuantizerState) if f.name not in _CHILDREN])


# --- one leaf ----------------------------------------------------------------------------------

def _align(per_input: jax.Array, ndim: int) -> jax.Array:
    lead = per_input.shape[:-1]
    return per_input.reshape(*lead, *(1,) * (ndim - len(lead) - 1), per_input.shape[-1])


def _to_groups(st: QuantizerState, w: jax.Array) -> jax.Array:
    """Latent weight (logical layout) -> stored order, grouped ``[*rest, n_groups, group]``."""
    wt = jnp.moveaxis(w, st.axis, -1)
    if st.input_scale is not None:
        wt = wt / _align(st.input_scale.astype(jnp.float32), wt.ndim)
    if st.perm is not None:
        wt = jnp.take_along_axis(wt, jnp.broadcast_to(_align(st.perm, wt.ndim), wt.shape), -1)
    return wt.reshape(*wt.shape[:-1], st.size // st.group_size, st.group_size)


def _from_groups(st: QuantizerState, wq: jax.Array) -> jax.Array:
    """Decoded groups -> the logical tensor, exactly as ``QArray.materialize`` finishes."""
    w = undo_input_transforms(wq.reshape(*wq.shape[:-2], st.size), st.perm, st.input_scale)
    return jnp.moveaxis(w, -1, st.axis).astype(st.dtype)


def _lsq_gain(st: QuantizerState, wg: jax.Array) -> float:
    """LSQ's gradient scale ``1 / sqrt(N * Qp)``: N weights per step, Qp the top level."""
    qp = 2 ** (st.bits - 1) - 1 if st.symmetric else 2**st.bits - 1
    return 1.0 / math.sqrt(wg.size // st.scale.size * qp)


def _grid(st: QuantizerState, wg: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Scales and offsets as stored (``scale_dtype``), with the estimator's gradients."""
    sg = jax.lax.stop_gradient
    if st.fmt != "affine":
        return sg(st.scale), None
    if st.clip is not None:
        per_tensor = st.clip.shape != wg.shape[:-1]
        axes = tuple(range(wg.ndim)) if per_tensor else (-1,)
        s, b = formats.affine_params(sg(wg), st.bits, st.symmetric, axes, st.clip[..., None])
        s, b = s[..., 0], b[..., 0]
    elif st.estimator == "lsq":
        s = est.scale_grad(st.scale, _lsq_gain(st, wg))
        b = sg(st.bias) * formats.exact_div(s, sg(st.scale0))  # == bias exactly at scale0
    elif st.estimator == "lsq+":
        gain = _lsq_gain(st, wg)
        s, b = est.scale_grad(st.scale, gain), est.scale_grad(st.bias, gain)
    else:
        s, b = sg(st.scale), sg(st.bias)
    return s.astype(st.scale_dtype), b.astype(st.scale_dtype)


def _table_codes(st: QuantizerState, wg: jax.Array, s: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Codes of a codebook / float format and the in-range mask (the clipped STE's)."""
    wf = wg.astype(jnp.float32)
    if st.fmt == "nf4":
        sf = s.astype(jnp.float32)[..., None]
        x = jnp.where(sf != 0, formats.exact_div(wf, sf), 0.0)
        return ff.nf4_codes(x), jnp.abs(x) <= 1.0
    if st.fmt.startswith("fp8_"):
        variant = st.fmt[4:]
        x = formats.exact_div(wf, s.astype(jnp.float32)[..., None])
        return ff.fp8_codes(x, variant), jnp.abs(x) <= ff.FP8_MAX[variant]
    x = formats.exact_div(wf, ff.e8m0_values(s)[..., None])  # a power of 2: exact
    codes = ff.fp4_codes(x) if st.bits == 4 else ff.fp8_codes(x)
    return codes, jnp.abs(x) <= _MX_ELEM_MAX[st.fmt]


def fake_quant(st: QuantizerState, w: jax.Array) -> jax.Array:
    """The fake-quantized logical tensor (``st.dtype``), differentiable per ``st.estimator``."""
    wg = _to_groups(st, w)
    s, b = _grid(st, wg)
    clipped = st.estimator != "ste"
    if st.fmt == "affine":
        return _from_groups(st, est.fake_quant_affine(wg, s, b, st.bits, clipped))
    codes, inside = _table_codes(st, jax.lax.stop_gradient(wg), s)
    wq = est.decode_groups(st.fmt, st.bits, s, None, codes)
    mask = inside.astype(jnp.float32) if clipped else jnp.ones((), jnp.float32)
    return _from_groups(st, est.straight_through(wg.astype(jnp.float32), wq, mask))


def _with_act(st: QuantizerState, w: Any) -> Any:
    return w if st.act_bits is None else ActQuant(weight=w, act_bits=st.act_bits, axis=st.axis)


def convert_leaf(st: QuantizerState, w: jax.Array) -> QArray:
    """The QArray holding the codes and scales :func:`fake_quant` used for ``w``."""
    wg = _to_groups(st, w)
    s, b = _grid(st, wg)
    if st.fmt == "affine":
        codes = est.affine_codes(wg, s, b, st.bits)
    else:
        codes = _table_codes(st, wg, s)[0]
    packed = packing.pack(codes.reshape(*codes.shape[:-2], st.size), st.bits)
    return QArray(packed=packed, scales=s, biases=b, bits=st.bits, group_size=st.group_size,
                  size=st.size, axis=st.axis, dtype=st.dtype, fmt=st.fmt, perm=st.perm,
                  input_scale=st.input_scale)


# --- the spec ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class QAT(LeafTransform):
    """Quantization-aware training of the selected leaves.

    Attributes:
      bits, group_size, symmetric, clip, scale_dtype: as :class:`~jaxq.quant.rtn.RTN` (the
        initial grid is RTN's). ``format``: ``"affine"``, ``"nf4"`` (``group_size`` is the
        block), ``"fp8_e4m3"``/``"fp8_e5m2"`` (per channel, or ``group_size="tensor"``),
        ``"mxfp4"``/``"mxfp8"`` (groups of 32); ``bits`` is the format's own outside affine.
      estimator: ``"ste"`` (identity gradient, grid frozen), ``"clipped_ste"`` (zero gradient
        outside the grid's range), ``"lsq"`` (learned step, LSQ gradient and gradient scale;
        the zero point is kept), ``"lsq+"`` (learned step and offset). LSQ: affine only.
      learn_clip: affine STE estimators only: a clip ratio per group is learned; the grid is the
        min-max grid of the current latent weights shrunk by it.
      act_bits: also fake-quantize the activations at these weights' matmuls (per token,
        symmetric, e.g. 8 for W4A8 / W8A8): ``apply`` and ``convert`` then give
        :class:`~jaxq.qat.act.ActQuant` leaves, so run the model through ``jaxq.apply``.

    Used as a transform (``QAT(...)(params)``) it is its own step 0: RTN in its format.

    >>> import jax.numpy as jnp, jaxq.qat
    >>> qat = jaxq.qat.QAT(bits=4, group_size=32, estimator="lsq")
    >>> params = {"dense": {"kernel": jnp.ones((64, 8))}}
    >>> state = qat.init(params)
    >>> fq = qat.apply(params, state)  # inside the loss
    >>> qat.convert(params, state)["dense"]["kernel"].bits
    4
    """

    bits: int = 4
    group_size: int | str | None = 64
    format: str = "affine"
    symmetric: bool = False
    clip: str = "minmax"
    scale_dtype: Any = None
    estimator: str = "ste"
    learn_clip: bool = False
    act_bits: int | None = None

    def __post_init__(self) -> None:
        formats.check_quantizer_fields(self)
        if self.act_bits is not None and (isinstance(self.act_bits, bool)
                                          or self.act_bits not in range(2, 9)):
            raise ValueError(f"QAT act_bits must be None or 2 to 8, got {self.act_bits!r}")
        if self.format not in FORMATS:
            raise ValueError(f"QAT format must be one of {FORMATS}, got {self.format!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"QAT estimator must be one of {ESTIMATORS}, "
                             f"got {self.estimator!r}")
        if self.format != "affine" and (self.estimator.startswith("lsq") or self.learn_clip):
            raise ValueError(f"QAT {self.estimator}{' learn_clip' * self.learn_clip} trains "
                             f"affine grids only, not {self.format!r}: use 'ste' or "
                             f"'clipped_ste'")
        if self.learn_clip and self.estimator.startswith("lsq"):
            raise ValueError("learn_clip goes with 'ste'/'clipped_ste'; LSQ learns the step")
        if self.estimator.startswith("lsq") and self.bits < 2:
            raise ValueError("LSQ needs at least 2 bits")

    # --- the step-0 quantizer --------------------------------------------------------------
    def transform_leaf(self, path: str, leaf: Any, *, axis: int, stats: Stats | None) -> QArray:
        if self.format == "affine":
            return rtn_quantize(leaf, bits=self.bits, group_size=self.group_size, axis=axis,
                                symmetric=self.symmetric, clip=self.clip,
                                scale_dtype=self.scale_dtype, name=path)
        if self.format == "nf4":
            return ff.nf4_quantize(leaf, block_size=self.group_size, axis=axis,
                                   scale_dtype=self.scale_dtype or jnp.float32, name=path)
        if self.format.startswith("fp8_"):
            return ff.fp8_quantize(leaf, variant=self.format[4:], axis=axis,
                                   granularity="tensor" if self.group_size == "tensor"
                                   else "channel", name=path)
        return ff.mx_quantize(leaf, mode=self.format, axis=axis, name=path)

    def _state(self, path: str, qa: QArray, from_ptq: bool) -> QuantizerState:
        if type(qa) is not QArray or qa.fmt not in FORMATS:
            raise ValueError(f"{path}: QAT continues plain QArrays of formats {FORMATS}, "
                             f"not {type(qa).__name__} {qa.fmt!r}")
        if qa.fmt != "affine" and (self.estimator.startswith("lsq") or self.learn_clip):
            raise ValueError(f"{path}: {self.estimator} trains affine grids, the PTQ leaf "
                             f"is {qa.fmt!r}")
        if self.learn_clip and from_ptq:
            raise ValueError(f"{path}: learn_clip recomputes the grid from the latent weights, "
                             "so it cannot continue a PTQ grid; use 'lsq+' instead")
        floating = jnp.issubdtype(qa.scales.dtype, jnp.floating)
        scale = qa.scales.astype(jnp.float32) if floating else qa.scales
        bias = None if qa.biases is None else qa.biases.astype(jnp.float32)
        clip = jnp.ones(scale.shape, jnp.float32) if self.learn_clip else None
        return QuantizerState(
            scale=None if clip is not None else scale, bias=None if clip is not None else bias,
            scale0=scale if self.estimator == "lsq" else None, clip=clip, perm=qa.perm,
            input_scale=qa.input_scale, fmt=qa.fmt, bits=qa.bits, group_size=qa.group_size,
            size=qa.size, axis=qa.axis, dtype=jnp.dtype(qa.dtype),
            scale_dtype=jnp.dtype(qa.scales.dtype), estimator=self.estimator,
            symmetric=self.symmetric, act_bits=self.act_bits)

    # --- optax-shaped API ------------------------------------------------------------------
    def init(self, params: Any, *, from_: Any = None,
             axes: Mapping[str, int] | None = None) -> Any:
        """The state: a :class:`QuantizerState` at each selected leaf, None elsewhere.

        Without ``from_`` the grid is RTN's on ``params`` (in this spec's format). With
        ``from_`` (a PTQ result: RTN, GPTQ, AWQ+GPTQ; same tree structure) every QArray leaf
        of it continues with its own format, bits, groups, scales, offsets and input
        transforms (``overrides={path: None}`` still skips one: it stays float, dequantized,
        in ``convert``'s output); ``params`` should then be
        :func:`latent_from` ``(from_)``, so that step 0 is exactly the PTQ model.
        ``axes``: input axis per path (default: inferred as RTN does).
        """
        leaves, treedef = flatten_with_paths(params)
        ptq = [None] * len(leaves) if from_ is None else _flatten_like(treedef, from_, "from_")
        axes = axes or {}
        out = []
        for (path, leaf), qa in zip(leaves, ptq):
            if isinstance(qa, QArray):
                cfg = self._overridden(path)
                if cfg is None:
                    out.append(None)
                    continue
                if tuple(jnp.shape(leaf)) != qa.shape:
                    raise ValueError(f"{path}: latent weight shape {jnp.shape(leaf)} differs "
                                     f"from the PTQ leaf's {qa.shape}")
                out.append(cfg._state(path, qa, True))
                continue
            cfg = self.resolve(path, leaf)
            if cfg is None:
                out.append(None)
                continue
            axis = axes.get(path, infer_input_axis(path, leaf))
            out.append(cfg._state(path, cfg.transform_leaf(path, leaf, axis=axis, stats=None),
                                  False))
        return jax.tree_util.tree_unflatten(treedef, out)

    def _overridden(self, path: str) -> QAT | None:
        """The config for a PTQ-quantized leaf that ``where`` did not select (overrides only)."""
        return dataclasses.replace(self, where=lambda p, x: True).resolve(path, None)

    def apply(self, params: Any, state: Any) -> Any:
        """``params`` with each selected leaf fake-quantized (use inside the loss)."""
        return _map_state(lambda st, w: _with_act(st, fake_quant(st, w)), params, state)

    def convert(self, params: Any, state: Any) -> Any:
        """``params`` with each selected leaf a QArray of the codes ``apply`` used (inside an
        :class:`~jaxq.qat.act.ActQuant` with ``act_bits``)."""
        return _map_state(lambda st, w: _with_act(st, convert_leaf(st, w)), params, state)


def _flatten_like(treedef: Any, tree: Any, name: str) -> list:
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"QAT: {name} does not have the structure of params: {e}") from None


def _map_state(fn: Any, params: Any, state: Any) -> Any:
    leaves, treedef = flatten_with_paths(params)
    states = _flatten_like(treedef, state, "state")
    out = [leaf if st is None else fn(st, leaf) for (_, leaf), st in zip(leaves, states)]
    return jax.tree_util.tree_unflatten(treedef, out)


# --- starting points and optimizer views -------------------------------------------------------

def latent_from(qparams: Any, dtype: Any = jnp.float32) -> Any:
    """Latent float weights that continue a PTQ result: each QArray dequantized (``dtype``).

    Why the dequantized weights and not the original ones with PTQ's scales: GPTQ's gain is in
    its error-compensated codes, not its grid. Rounding the original weights onto GPTQ's grid
    gives RTN-quality codes; the dequantized weights sit exactly on GPTQ's codes, so step 0
    reproduces the PTQ model and training only moves a code once its latent weight has drifted
    half a step. AWQ's folded norms are in ``qparams`` too, which is why the latent tree is
    built from it. Float32 master weights keep the codes recoverable (bfloat16 cannot hold an
    8-bit grid point).
    """
    return jax.tree.map(lambda x: x.materialize(dtype) if type(x) is QArray else x, qparams,
                        is_leaf=leaf_lib.is_leaf)


def partition(params: Any, state: Any, where: Any = None) -> tuple[Any, Any]:
    """``(trainable, frozen)``, each a ``(params, state)`` pair with None on the other side.

    Trainable: every float array of ``params`` (or those ``where(path, x)`` selects) and the
    float children of its compressed leaves, and the learned children of each quantizer state
    (LSQ's step, LSQ+'s offset, learned clip ratios). Frozen: integer arrays, permutations,
    PTQ input scales, frozen grids. Put them back with ``jaxq.combine(trainable, frozen)``.
    """
    p_train, p_frozen = _split_params(params, where)

    def split(st: Any, take: bool) -> Any:
        if not isinstance(st, QuantizerState):
            return None if take else st
        keep = set(st.trainable_fields())
        return dataclasses.replace(st, **{f: None for f in _CHILDREN
                                          if (f in keep) != take})

    is_state = lambda x: x is None or isinstance(x, QuantizerState)  # noqa: E731
    s_train = jax.tree.map(lambda st: split(st, True), state, is_leaf=is_state)
    s_frozen = jax.tree.map(lambda st: split(st, False), state, is_leaf=is_state)
    return (p_train, s_train), (p_frozen, s_frozen)


def _split_params(params: Any, where: Any) -> tuple[Any, Any]:
    """The params side of :func:`partition`: leaf by leaf over the flattened tree, so that no
    container of the model (equinox keeps layers in tuples) is mistaken for a pair."""
    leaves, treedef = flatten_with_paths(params)
    train, frozen = [], []
    for path, x in leaves:
        if leaf_lib.is_leaf(x):
            t, f = leaf_lib.partition(x)
        elif (jnp.issubdtype(jnp.result_type(x), jnp.inexact)
              and (where is None or where(path, x))):
            t, f = x, None
        else:
            t, f = None, x
        train.append(t)
        frozen.append(f)
    return (jax.tree_util.tree_unflatten(treedef, train),
            jax.tree_util.tree_unflatten(treedef, frozen))


def labels(trainable: Any) -> Any:
    """``optax.multi_transform`` labels for :func:`partition`'s trainable side: ``"weights"``
    for the latent weights, ``"quantizer"`` for the grid parameters."""
    params, state = trainable
    return (jax.tree.map(lambda _: "weights", params),
            jax.tree.map(lambda _: "quantizer", state))


def trainable(params: Any, state: Any, where: Any = None) -> Any:
    """Bool tree over ``(params, state)``: True where :func:`partition` trains (for
    ``optax.masked``)."""
    train, _ = partition(params, state, where)
    return jax.tree.map(lambda x: x is not None, train, is_leaf=lambda x: x is None)
