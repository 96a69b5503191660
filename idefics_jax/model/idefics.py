"""The vision-language model: vision encoder -> connector -> image tokens merged into the text -> decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from idefics_jax.model.config import ModelConfig, PerceiverConfig, PixelShuffleConfig
from idefics_jax.model.connector import PixelShuffleConnector
from idefics_jax.model.decoder import Decoder, KVCache, causal_mask  # noqa: F401 (KVCache: public here)
from idefics_jax.model.config import GenerationDefaults
from idefics_jax.model.layers import param
from idefics_jax.model.perceiver import PerceiverConnector
from idefics_jax.model.sharding import Partitioning, constrain, put
from idefics_jax.model.vision import VisionEncoder, patch_mask  # noqa: F401 (patch_mask: public here)
from idefics_jax.ops.attention import Attention, Mask
from idefics_jax.ops.decode_weights import Layers
from idefics_jax.ops.matmul import matmul, tie_to_input

# The connector is chosen by the type of its config; only the perceiver attends.
CONNECTORS = {
    PixelShuffleConfig: lambda c, rngs, dtype, attention: PixelShuffleConnector(c, rngs=rngs, dtype=dtype),
    PerceiverConfig: lambda c, rngs, dtype, attention: PerceiverConnector(c, rngs=rngs, dtype=dtype,
                                                                          attention=attention),
}


def real_images(pixel_values_BICHW) -> jax.Array:
    """(B*I,) True for real images; padding images are exactly zero everywhere."""
    B, I = pixel_values_BICHW.shape[:2]
    return jnp.any(pixel_values_BICHW.reshape(B * I, -1) != 0, axis=1)


def merge_image_features(x_BTD, input_ids_BT, feats_ITD, real_I, image_token_id: int):
    """Writes the real images' features, in (batch, image) order, over the image-token embeddings.

    Static shapes: the k-th image token (row-major over the batch) takes row k % T of the (k // T)-th real image.
    """
    B, T, D = x_BTD.shape
    I, Timg = feats_ITD.shape[:2]
    is_img = (input_ids_BT == image_token_id).reshape(-1)
    k = jnp.cumsum(is_img) - 1
    slots = jnp.nonzero(real_I, size=I, fill_value=0)[0]
    img = slots[jnp.clip(k // Timg, 0, I - 1)]
    rows = feats_ITD[img, jnp.clip(k % Timg, 0, Timg - 1)].astype(x_BTD.dtype)
    return jnp.where(is_img[:, None], rows, x_BTD.reshape(B * T, D)).reshape(B, T, D)


def merge_features_at(x_BTD, input_ids_BT, feats_BITD, offset_B, image_token_id: int):
    """Per row b: its k-th image token (k from 0, in order) takes row (offset_B[b] + k) % Ti of image
    (offset_B[b] + k) // Ti of feats_BITD[b] (B, I, Ti, D): a prompt's rest after a cached prefix, whose first
    image tokens may continue an image begun in the prefix."""
    I, Ti = feats_BITD.shape[1:3]

    def row(x_TD, ids_T, feats_ITD, offset):
        is_img = ids_T == image_token_id
        k = offset + jnp.cumsum(is_img) - 1
        rows = feats_ITD[jnp.clip(k // Ti, 0, I - 1), jnp.clip(k % Ti, 0, Ti - 1)].astype(x_TD.dtype)
        return jnp.where(is_img[:, None], rows, x_TD)

    return jax.vmap(row)(x_BTD, input_ids_BT, feats_BITD, offset_B)


def positions_from_mask(attention_mask_BT):
    """Position ids as `generate` makes them: cumsum of the mask minus one, pads at 1."""
    pos = jnp.cumsum(attention_mask_BT, axis=-1) - 1
    return jnp.where(attention_mask_BT == 0, 1, pos)


def positions_from_segments(segment_ids_BT):
    """Position ids of packed rows: counting from 0 again at the start of each segment (record)."""
    t = jnp.arange(segment_ids_BT.shape[1])[None]
    first = jnp.concatenate([jnp.ones_like(segment_ids_BT[:, :1], bool),
                             segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(first, t, 0), axis=1)


class IdeficsModel(nnx.Module):
    """Idefics2 / Idefics3 / SmolVLM for conditional generation.

    Call it with the HF processor's numpy outputs: `model(input_ids, attention_mask, pixel_values,
    pixel_attention_mask) -> logits (B, T, V) float32`. On a mesh the logits are a global array sharded over
    it: `idefics_jax.model.sharding.to_host(logits)` gathers them on every process.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 partitioning: Partitioning | None = None, attention: str | None = None):
        """partitioning: the mesh and rules the activations are laid out by (`load_pretrained(mesh=...)` sets it);
        None runs unconstrained, wherever the arrays are. attention: the backend of every attention with a `Mask`
        ("xla", "cudnn", "pallas"; None: the platform's, see `ops.attention.attend`); `set_attention` changes it."""
        self.config = config
        self.partitioning = partitioning
        attn = Attention(attention, partitioning)
        self.vision = VisionEncoder(config.vision, rngs=rngs, dtype=dtype, partitioning=partitioning, attention=attn)
        self.connector = CONNECTORS[type(config.connector)](config, rngs, dtype, attn)
        self.text = Decoder(config.text, rngs=rngs, dtype=dtype, partitioning=partitioning, attention=attn)
        if not config.tie_word_embeddings:
            self.lm_head = param(rngs, (config.text.hidden_size, config.text.vocab_size), ("embed", "vocab"),
                                 dtype=dtype, fan_in=1)
        # eos / pad ids `generate` defaults to; `load_pretrained` sets the checkpoint's.
        self.generation_defaults = GenerationDefaults()

    @property
    def dtype(self):
        return self.text.embed.dtype

    @property
    def attention(self) -> str | None:
        """The attention backend (None: the platform's)."""
        return self.text.attention.backend

    def set_attention(self, backend: str | None) -> "IdeficsModel":
        """Every tower's attention backend ("xla", "cudnn", "pallas"; None: the platform's); returns the model."""
        attn = Attention(backend, self.partitioning)
        for _, module in nnx.iter_graph(self):
            if isinstance(getattr(module, "attention", None), Attention):
                module.attention = attn
        return self

    def image_features(self, pixel_values_BICHW, pixel_mask_BIHW=None, remat: str = "none"):
        """-> features (B*I, image_seq_len, D) for every image slot, and which slots are real images (B*I,)."""
        B, I, C, H, W = pixel_values_BICHW.shape
        pixels = constrain(pixel_values_BICHW.reshape(B * I, C, H, W), ("batch", None, None, None), self.partitioning)
        real = real_images(pixel_values_BICHW)
        if pixel_mask_BIHW is None:
            pixel_mask = jnp.ones((B * I, H, W), bool)
        else:
            pixel_mask = pixel_mask_BIHW.reshape(B * I, H, W)
        v = self.config.vision
        pmask = patch_mask(pixel_mask, v.patch_size, v.patch_valid_if_all_pixels)
        # Padding images run with a full mask so that no NaN can reach a gradient; their rows are never read.
        pmask = pmask | ~real[:, None, None]
        hidden = self.vision(pixels, pmask, remat=remat)
        feats = self.connector(hidden, pmask.reshape(B * I, -1))
        feats = constrain(feats, ("batch", None, None), self.partitioning)
        return feats, real

    def embed(self, input_ids_BT, pixel_values=None, pixel_attention_mask=None, remat: str = "none",
              one_image_at_a_time: bool = False):
        """Token embeddings (B, T, D) with the images' features written over the image tokens.

        one_image_at_a_time: run the vision tower on one image after another (`lax.map`); on the CPU all images at
        once materialise every layer's attention scores for all of them (GBs at batch 8) and run slower.
        """
        # Looked up in the width-sharded table with every token id (the ids are small): each device takes its
        # slice of the width for all tokens, and the rows then move to their batch shard (B*T*D values). Gathering
        # the table whole instead holds all of it on every device, and in training its gradient too: a
        # scatter-add into the whole table (3 GiB per device for Idefics3-8B in bf16 on the CPU compile,
        # docs/memory-plan.md), where the width-sharded one is an eighth.
        partitioning = self.partitioning
        ids = constrain(input_ids_BT, (None, None), partitioning)
        x = constrain(jnp.take(self.text.embed[...], ids, axis=0), (None, None, "embed"), partitioning)
        x = constrain(x, ("batch", None, None), partitioning)
        if pixel_values is None:
            return x
        if one_image_at_a_time:
            B, I = pixel_values.shape[:2]
            single = lambda a: None if a is None else a.reshape(B * I, 1, 1, *a.shape[2:])  # noqa: E731
            feats = jax.lax.map(lambda pair: self.image_features(*pair, remat=remat)[0][0],
                                (single(pixel_values), single(pixel_attention_mask)))
            real = real_images(pixel_values)
        else:
            feats, real = self.image_features(pixel_values, pixel_attention_mask, remat=remat)
        return merge_image_features(x, input_ids_BT, feats, real, self.config.image_token_id)

    def lm_weight(self):
        """The vocabulary projection (D, V): lm_head, or the embedding table when they are tied."""
        return self.text.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]

    def lm_logits(self, h_BTD):
        h_BTD, w = tie_to_input(self.lm_weight(), h_BTD)
        logits = matmul("BTD,DV->BTV", h_BTD, w).astype(jnp.float32)
        return constrain(logits, ("batch", None, "vocab"), self.partitioning)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
                remat: str = "none", segment_ids=None):
        """Traceable forward pass (use inside your own jit / grad). Shapes as in `__call__`."""
        return self.lm_logits(self.hidden(input_ids, attention_mask, pixel_values, pixel_attention_mask, remat,
                                          segment_ids))

    def hidden(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None,
               remat: str = "none", segment_ids=None):
        """The decoder's final-normed hidden states (B, T, D): `forward` without the vocabulary projection.

        remat: "none", "full" (recompute each layer in the backward pass) or "matmuls" (keep the matmul outputs,
        recompute the rest). segment_ids (B, T) int: packed rows, one id per record (0: padding): attention stays
        within a record and positions restart at each; replaces `attention_mask`.
        """
        if segment_ids is not None:
            segments, positions = segment_ids, positions_from_segments(segment_ids)
        else:
            segments = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
            positions = positions_from_mask(segments)
        x = self.embed(input_ids, pixel_values, pixel_attention_mask, remat=remat)
        mask = Mask.decoder(segments, self.config.text.sliding_window)
        h, _ = self.text(x, positions, mask, remat=remat)
        return h

    # ---- the decode core: the cache, a prompt's prefill, one decode step (traceable; used inside jit) ---------------
    def init_cache(self, batch: int, slots: int, layers: Layers | None = None) -> KVCache:
        """An empty cache of `slots` columns for `batch` rows, as `layers`' loop carries it (sharded on a mesh)."""
        cache = KVCache.zeros(self.config.text, batch, slots, self.dtype, self.partitioning)
        return cache if layers is None else cache.laid_out(layers)

    def prefill(self, input_ids_BT, attention_mask_BT, pixel_values=None, pixel_attention_mask=None,
                layers: Layers | None = None, one_image_at_a_time: bool = False):
        """Runs a left-padded prompt (B, T) -> (the last token's logits (B, V) float32, a cache of its T columns
        laid out for `layers`' loop). The vision tower runs here, once."""
        c = self.config.text
        x = self.embed(input_ids_BT, pixel_values, pixel_attention_mask, one_image_at_a_time=one_image_at_a_time)
        # A cache of exactly T columns keeps prefill attention at T x T.
        cache = KVCache.zeros(c, input_ids_BT.shape[0], input_ids_BT.shape[1], self.dtype, self.partitioning)
        mask = Mask.decoder(attention_mask_BT, c.sliding_window)
        h, cache = self.text(x, positions_from_mask(attention_mask_BT), mask, cache, 0,
                             layers=None if layers is None else layers.for_prefill())
        cache = cache if layers is None else cache.laid_out(layers)
        return self.lm_logits(h[:, -1:])[:, 0], cache

    def prefill_after(self, prefix: KVCache, prefix_mask_BP, input_ids_BT, attention_mask_BT, feats_BITD=None,
                      offset_B=None, layers: Layers | None = None):
        """Runs the rest of prompts after cached keys and values -> (each row's last real token's logits (B, V)
        float32, a cache of the P + T columns laid out for `layers`' loop).

        prefix: stacked keys and values (L, B, K, P, H) of the prompts' first tokens (positions 0, 1, ...), left
        padded: prefix_mask_BP marks the real columns. input_ids_BT / attention_mask_BT: the rest of each prompt,
        padded on the right. feats_BITD: the image features its image tokens take (`merge_features_at`, from
        offset_B), or None when it has none."""
        c = self.config.text
        B, T = input_ids_BT.shape
        P = prefix_mask_BP.shape[1]
        x = self.embed(input_ids_BT)
        if feats_BITD is not None:
            x = merge_features_at(x, input_ids_BT, feats_BITD, offset_B, self.config.image_token_id)
        new = KVCache.zeros(c, B, T, self.dtype, self.partitioning)
        cache = KVCache(*(jnp.concatenate([a.astype(self.dtype), b], axis=3) for a, b in
                          ((prefix.k, new.k), (prefix.v, new.v))))
        valid_BS = jnp.concatenate([prefix_mask_BP, attention_mask_BT], axis=1).astype(jnp.int32)
        pos_BS = positions_from_mask(valid_BS)
        pos_BT = pos_BS[:, P:]
        causal = jnp.arange(P + T)[None, :] <= P + jnp.arange(T)[:, None]
        allowed = causal[None] & valid_BS[:, None, :].astype(bool)
        if c.sliding_window is not None:
            allowed &= pos_BS[:, None, :] > pos_BT[:, :, None] - c.sliding_window
        h, cache = self.text(x, pos_BT, allowed, cache, P, layers=None if layers is None else layers.for_prefill())
        cache = cache if layers is None else cache.laid_out(layers)
        last = jnp.sum(attention_mask_BT, axis=1) - 1
        return self.lm_logits(h[jnp.arange(B), last][:, None])[:, 0], cache

    def step(self, tokens_B, pos_B, mask_BS, cache: KVCache, column, layers: Layers | None = None):
        """One decode step: each row's token at its position, its key and value written in cache `column` (one
        scalar for all rows), attending to the columns `mask_BS` allows -> (logits (B, V) float32, the cache)."""
        h, cache = self.text(self.embed(tokens_B[:, None]), pos_B[:, None], mask_BS[:, None, :], cache, column,
                             layers=layers)
        return self.lm_logits(h)[:, 0], cache

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, pixel_attention_mask=None):
        """input_ids (B, T) int; attention_mask (B, T) 1 = token; pixel_values (B, I, C, H, W) float with all-zero
        padding images; pixel_attention_mask (B, I, H, W) 1 = valid pixel. Returns logits (B, T, V) float32."""
        check_inputs(self.config, input_ids, attention_mask, pixel_values, pixel_attention_mask)
        # Every process passes the same whole batch; each places its own devices' slices of it.
        batch = lambda x: None if x is None else put(x, ("batch",) + (None,) * (np.ndim(x) - 1), self.partitioning)  # noqa: E731
        return _jit_forward(self, *map(batch, (input_ids, attention_mask, pixel_values, pixel_attention_mask)))


@nnx.jit
def _jit_forward(model, input_ids, attention_mask, pixel_values, pixel_attention_mask):
    return model.forward(input_ids, attention_mask, pixel_values, pixel_attention_mask)


def matmul_fan_in(model: nnx.Module) -> dict[str, int | None]:
    """Parameter path ("text/layers/q") -> how many leading dimensions of the weight a matmul contracts (after the
    layer axis of stacked weights), or None for norms, biases, embeddings and latents."""
    return {"/".join(map(str, p)): v.get_metadata().get("fan_in") for p, v in nnx.to_flat_state(nnx.state(model))}


def check_inputs(config: ModelConfig, input_ids, attention_mask, pixel_values, pixel_attention_mask) -> None:
    """Host-side checks, before any device work; raises ValueError naming the problem."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a 2-D integer array (batch, tokens); got shape {ids.shape} {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.text.vocab_size):
        # jnp.take would quietly turn these into NaN embeddings.
        raise ValueError(
            f"input_ids must lie in [0, {config.text.vocab_size}); got values from {ids.min()} to {ids.max()}")
    if attention_mask is not None and np.shape(attention_mask) != ids.shape:
        raise ValueError(f"attention_mask shape {np.shape(attention_mask)} differs from input_ids shape {ids.shape}")
    n_tokens = int((ids == config.image_token_id).sum())
    if pixel_values is None:
        if n_tokens:
            raise ValueError(f"input_ids hold {n_tokens} image tokens but no pixel_values were given")
        return
    pv = np.asarray(pixel_values)
    if pv.ndim != 5:
        raise ValueError(f"pixel_values must be 5-D (batch, images, channels, height, width); got shape {pv.shape}")
    if pv.shape[0] != ids.shape[0]:
        raise ValueError(f"pixel_values batch {pv.shape[0]} differs from input_ids batch {ids.shape[0]}")
    if pixel_attention_mask is not None and np.shape(pixel_attention_mask) != pv.shape[:2] + pv.shape[3:]:
        raise ValueError(
            f"pixel_attention_mask shape {np.shape(pixel_attention_mask)} does not match pixel_values {pv.shape}"
        )
    n_real = int(np.any(pv.reshape(pv.shape[0] * pv.shape[1], -1) != 0, axis=1).sum())
    if n_tokens != n_real * config.image_seq_len:
        raise ValueError(
            f"image tokens and images do not match: {n_tokens} image tokens for {n_real} images "
            f"x {config.image_seq_len} tokens each"
        )
