"""One optimisation step: next-token cross-entropy on `labels` (-100 ignored), gradients over the trainable
parameters (all of them, the unfrozen parts, or LoRA adapters), micro-batch accumulation, and an optax update.

The batch is a dict of the HF processor's arrays (`input_ids`, `attention_mask`, `pixel_values`,
`pixel_attention_mask`) plus `labels` (B, T) aligned with `input_ids` as in transformers: the logits at t are scored
against `labels[:, t + 1]`; IGNORE_INDEX (-100) marks tokens that carry no loss (prompt, padding, image
tokens).

Parameters are plain dicts keyed by path ("text/layers/q"); the model is rebuilt around them inside the jitted
step. On a mesh the step needs nothing more: parameters and optimizer state carry their shardings, the model
constrains its activations, and the compiler inserts the collectives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from idefics_jax.model import sharding as sharding
from idefics_jax.model.idefics import matmul_fan_in
from idefics_jax.ops import heap
from idefics_jax.ops.weights import cast, dense, weight_format
from idefics_jax.train import lora as lora_lib
from idefics_jax.train.collate import IGNORE_INDEX
from idefics_jax.train.config import LoraConfig

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
LOSS_CHUNK = 512  # tokens whose vocabulary scores exist at once in the loss


def cross_entropy(logits_BTV, labels_BT):
    """-> (summed loss, number of scored tokens); positions t predict labels t + 1, -100 ignored.

    A sum and a count rather than a mean, so that gradient accumulation can weigh micro-batches by tokens.
    """
    logits, labels = logits_BTV[:, :-1].astype(jnp.float32), labels_BT[:, 1:]
    valid = labels != IGNORE_INDEX
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


def chunked_cross_entropy(h_BTD, w_DV, labels_BT, chunk: int = LOSS_CHUNK):
    """`cross_entropy(h @ w, labels)` without the (B, T, V) logits: the tokens go through the vocabulary
    projection `chunk` at a time, and each chunk's gradient (softmax minus one-hot, through w) is taken there and
    then, so no chunk's scores outlive it. Scores in fp32.
    """
    h, labels = h_BTD[:, :-1], labels_BT[:, 1:]
    n = h.shape[0] * h.shape[1]
    pad = -n % chunk if n > chunk else 0
    h = jnp.pad(h.reshape(n, -1), ((0, pad), (0, 0)))
    labels = jnp.pad(labels.reshape(n), (0, pad), constant_values=IGNORE_INDEX)
    count = jnp.sum(labels != IGNORE_INDEX)
    return _ce_sum(h, w_DV, labels, min(chunk, n)), count


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ce_sum(h_ND, w_DV, labels_N, chunk):
    return _ce_fwd(h_ND, w_DV, labels_N, chunk)[0]


def _ce_fwd(h_ND, w_DV, labels_N, chunk):
    N, D = h_ND.shape

    def body(dw_DV, xs):
        h_CD, y_C = xs
        logits = jnp.einsum("CD,DV->CV", h_CD, w_DV, preferred_element_type=jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        valid = y_C != IGNORE_INDEX
        y = jnp.where(valid, y_C, 0)
        picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        nll = jnp.sum(jnp.where(valid, lse - picked, 0.0))
        # d nll / d logits = softmax - one-hot, on the scored tokens only.
        d = jnp.exp(logits - lse[:, None]) * valid[:, None]
        d = d.at[jnp.arange(y.shape[0]), y].add(-valid.astype(d.dtype))
        dh_CD = jnp.einsum("CV,DV->CD", d.astype(w_DV.dtype), w_DV, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.einsum("CD,CV->DV", h_CD, d.astype(h_CD.dtype), preferred_element_type=jnp.float32)
        return dw_DV, (nll, dh_CD)

    xs = (h_ND.reshape(N // chunk, chunk, D), labels_N.reshape(N // chunk, chunk))
    dw, (nll, dh) = jax.lax.scan(body, jnp.zeros(w_DV.shape, jnp.float32), xs)
    return jnp.sum(nll), (dh.reshape(N, D).astype(h_ND.dtype), dw.astype(w_DV.dtype))


def _ce_bwd(chunk, res, g):
    dh, dw = res
    return (g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None


_ce_sum.defvjp(_ce_fwd, _ce_bwd)


@dataclasses.dataclass(frozen=True)
class Split:
    """The model cut into its structure and two parameter dicts: what trains and what stays fixed."""

    graphdef: Any
    variables: tuple  # ((path, Variable), ...) with metadata, for rebuilding the model
    trainable: dict
    frozen: dict

    @property
    def fan_in(self) -> dict[str, int | None]:
        """Path -> matmul fan-in metadata of each model parameter (None: not a matmul weight)."""
        return {_path(p): v.get_metadata().get("fan_in") for p, v in self.variables}


def _path(p) -> str:
    return "/".join(map(str, p))


def split(model, freeze: tuple[str, ...] = (), lora: LoraConfig | None = None, key=None) -> Split:
    """Parameters under a `freeze` prefix ("vision", "connector", "text") stay fixed, and so do quantized weights
    (QLoRA); with LoRA (rank > 0) every model parameter is fixed and new adapters train instead."""
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    params = {_path(p): v.get_value() for p, v in flat}
    if lora is not None and lora.rank > 0:
        adapters = lora_lib.init(matmul_fan_in(model), params, lora, key if key is not None else jax.random.key(0))
        return Split(graphdef, tuple(flat), adapters, params)
    # Quantized weights (QLoRA's base) are fixed.
    frozen = {p: v for p, v in params.items()
              if weight_format(v) is not None or any(p == f or p.startswith(f + "/") for f in freeze)}
    return Split(graphdef, tuple(flat), {p: v for p, v in params.items() if p not in frozen}, frozen)


def merge(s: Split, params: dict):
    """The model around `params` (a full dict keyed by path)."""
    return nnx.merge(s.graphdef, nnx.from_flat_state([(p, v.replace(params[_path(p)])) for p, v in s.variables]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    trainable: dict
    opt_state: Any


def init_state(trainable: dict, tx: optax.GradientTransformation) -> TrainState:
    """The first state, committed to devices as the step's outputs are: an uncommitted leaf (a fresh scalar, a
    parameter never placed) makes the second step's arguments differ from the first's, and the step compiles
    twice."""
    leaves = jax.tree.leaves(trainable)
    mesh = next((x.sharding.mesh for x in leaves if isinstance(x.sharding, jax.sharding.NamedSharding)), None)
    home = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None else jax.devices()[0]
    # Under jit the moments are created like the parameters, so they share their shardings.
    state = TrainState(jnp.zeros((), jnp.int32), trainable, jax.jit(tx.init)(trainable))
    return jax.tree.map(lambda x: x if x.committed else jax.device_put(x, home), state)


def full_params(frozen: dict, trainable: dict, lora: LoraConfig | None = None, merge: bool = False) -> dict:
    """Every model parameter by path: `trainable` over `frozen`, or with LoRA the adapters merged into `frozen`
    (a quantized base keeps its adapter beside it, or with `merge` becomes a dequantized weight: see lora.apply)."""
    if lora is None or lora.rank <= 0:
        return {**frozen, **trainable}
    return lora_lib.apply(frozen, trainable, lora, merge=merge)


def _loss(s: Split, trainable, frozen, batch, *, compute_dtype, remat: str, lora: LoraConfig | None):
    """(summed loss, scored tokens) of the model with `trainable` over `frozen` on `batch` (a batch with
    `segment_ids` holds packed rows)."""
    params = full_params(frozen, trainable, lora)
    if compute_dtype is not None:
        params = {p: cast(v, compute_dtype) for p, v in params.items()}
    model = merge(s, params)
    h = model.hidden(*(batch.get(k) for k in MODEL_INPUTS), remat=remat, segment_ids=batch.get("segment_ids"))
    w = dense(model.lm_weight(), h.dtype)  # QLoRA's frozen head: the loss's chunks need it dense
    return chunked_cross_entropy(h, w, batch["labels"])


def make_train_step(s: Split, tx: optax.GradientTransformation, *, compute_dtype=None, remat: str = "none",
                    lora: LoraConfig | None = None, grad_accum: int = 1) -> Callable:
    """-> jitted `step(state, frozen, batch) -> (state, metrics)`; the old state is donated.

    compute_dtype: cast every parameter to it inside the step (bf16 compute over fp32 master weights).
    grad_accum: the batch is cut into this many micro-batches, run one after another, and their gradients summed
    before the single update; the loss is the mean over all scored tokens of the whole batch.
    remat: "none", "full" or "matmuls" (see `model.layers.checkpointed`). The attention backend is the model's
    (`IdeficsModel.set_attention`, before `split`).
    """
    heap.for_cpu_training()  # before the first step: XLA:CPU then reuses freed memory instead of faulting it in

    def total_loss(trainable, frozen, batch):
        return _loss(s, trainable, frozen, batch, compute_dtype=compute_dtype, remat=remat, lora=lora)

    grad_fn = jax.value_and_grad(total_loss, has_aux=True)

    def step(state: TrainState, frozen: dict, batch: dict):
        if grad_accum == 1:
            (total, count), grads = grad_fn(state.trainable, frozen, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def body(acc, mb):
                (t, c), g = grad_fn(state.trainable, frozen, mb)
                return jax.tree.map(jnp.add, acc, ((t, c), g)), None

            zero = ((jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)),
                    jax.tree.map(jnp.zeros_like, state.trainable))
            ((total, count), grads), _ = jax.lax.scan(body, zero, micro)
        n = jnp.maximum(count, 1)
        grads = jax.tree.map(lambda g: g / n, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": total / n, "tokens": count, "grad_norm": optax.tree.norm(grads)}
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return jax.jit(step, donate_argnums=(0,))


def make_loss(s: Split, *, compute_dtype=None, lora: LoraConfig | None = None) -> Callable:
    """-> jitted `loss(trainable, frozen, batch) -> (summed loss, scored tokens)`, for evaluation."""
    return jax.jit(lambda trainable, frozen, batch: _loss(s, trainable, frozen, batch, compute_dtype=compute_dtype,
                                                          remat="none", lora=lora))


def put_batch(batch: dict, partitioning: sharding.Partitioning | None) -> dict:
    """This host's batch as its rows of global arrays split over the batch axes of the mesh (several processes:
    each contributes its own rows, see `train.data`)."""
    return {k: sharding.put_process_local(v, ("batch",) + (None,) * (np.ndim(v) - 1), partitioning)
            for k, v in batch.items() if v is not None}
