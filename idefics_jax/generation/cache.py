"""The decode core's prompt caches: the keys and values of prompts already run (prefix cache) and the features of
images already encoded (image cache), each bounded, the least recently used going first.

Prefix cache: a prompt's tokens are cut into blocks of `BLOCK`. Block j's key hashes block j - 1's key, the
block's token ids and the content of the images whose tokens it holds (their pixels and pixel mask as the
processor made them, which carry its settings), so a key names all that the block's keys and values depend on:
two prompts whose image placeholders are the same tokens but whose images differ share nothing from the first
image token on. Full blocks live in one preallocated device pool (keys and values (L, N, K, BLOCK, H)). A prompt
reuses its longest chain of cached blocks (its last token always runs: its logits pick the first new token) and
prefills only the rest, continuing from the cached positions (`decode.prefill_after`). A prompt's blocks are
kept once it is prefilled, and its answer's when the answer ends, so the next turn of a conversation (the first
turn, its answer and a new message) finds them.

Image cache: the connector's output for each image tile, keyed by the tile's pixels and pixel mask; a hit skips
the vision tower.

    cache = PromptCache(model, prefix_cache_gb=1.0, image_cache_gb=0.25)
    row = cache.row(prompt, 0)                       # a prompt's tokens, image tiles and block keys
    cache.match(row)                                 # its cached prefix (row.cached tokens), pinned
    out = cache.prefill(core, [row], rows)           # runs the rest on a decode core
    cache.keep(state.cache, 0, row, cols)            # keeps its blocks: token p in column cols[p] of row 0
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from idefics_jax.generation.decode import Core
from idefics_jax.generation.prompt import Prompt, bucket
from idefics_jax.generation.sampling import Rows
from idefics_jax.model.idefics import IdeficsModel, KVCache

BLOCK = 16  # tokens per cached block
GiB = 2**30


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.digest()


@dataclasses.dataclass
class Tile:
    """One real image tile of a prompt: its content key, pixels (C, H, W) and pixel mask (H, W) or None."""

    key: bytes
    pixels: np.ndarray
    mask: np.ndarray | None


@dataclasses.dataclass
class Row:
    """One prompt as the caches see it: its real tokens (and, once `extend`ed, its answer's), its image tiles in
    order, one chained key per full block of tokens, and the pool blocks of its cached prefix (`match`)."""

    ids: np.ndarray  # (n,) int32
    prompt_len: int
    tiles: list[Tile]
    keys: list[bytes]
    hit: list[int] = dataclasses.field(default_factory=list)
    pinned: bool = False

    @property
    def cached(self) -> int:
        """Prompt tokens whose keys and values come from the cache."""
        return len(self.hit) * BLOCK


@functools.partial(jax.jit, donate_argnames=("pool",))
def _store(pool: KVCache, cache: KVCache, row, cols_NC, dst_N) -> KVCache:
    """Copies row `row`'s cache columns cols_NC (N blocks of C) into pool blocks dst_N."""

    def put(p, c):  # p (L, N', K, C, H); c (L, B, K, S, H) or L arrays (B, K, S, H)
        src = jnp.stack([a[row] for a in c]) if isinstance(c, list) else c[:, row]  # (L, K, S, H)
        g = jnp.take(src, cols_NC.reshape(-1), axis=2)
        L, K, _, H = g.shape
        g = jnp.swapaxes(g.reshape(L, K, *cols_NC.shape, H), 1, 2)
        return p.at[:, dst_N].set(g.astype(p.dtype))

    return KVCache(put(pool.k, cache.k), put(pool.v, cache.v))


@dataclasses.dataclass
class Prefilled:
    """Prompts run past their cached prefixes: their cache of C columns (row b's token p in column
    start_B[b] + p), its column mask (B, C), first tokens and whether they ended the request."""

    cache: KVCache
    mask_BC: np.ndarray
    start_B: np.ndarray
    first_B: np.ndarray
    done_B: np.ndarray


class PromptCache:
    """A prefix cache of `prefix_cache_gb` GiB of keys and values and an image cache of `image_cache_gb` GiB of
    features for `model` (either may be 0: off). One thread uses it (the engine's, or a `Chat`'s caller)."""

    def __init__(self, model: IdeficsModel, *, prefix_cache_gb: float = 1.0, image_cache_gb: float = 0.25):
        for name, v in (("prefix_cache_gb", prefix_cache_gb), ("image_cache_gb", image_cache_gb)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number of GiB >= 0; got {v!r}")
        self.model = model
        c = model.config.text
        self.block_bytes = 2 * c.num_layers * c.num_kv_heads * BLOCK * c.head_dim * jnp.dtype(model.dtype).itemsize
        self.capacity = int(prefix_cache_gb * GiB // self.block_bytes)  # blocks
        # One block more: the scratch block, the target of padding writes and the source of padding reads.
        self.pool = KVCache.zeros(c, self.capacity + 1, BLOCK, model.dtype) if self.capacity else None
        self._blocks: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # key -> block, LRU first
        self._free = list(range(self.capacity))
        self._pins: collections.Counter = collections.Counter()
        self.image_bytes = int(image_cache_gb * GiB)
        self._images: collections.OrderedDict[bytes, jax.Array] = collections.OrderedDict()
        self._image_used = 0
        self.stats = collections.Counter()  # prompt_tokens, cached_tokens, image_hits, image_misses, evicted

    def clear(self) -> None:
        """Forgets every block and image feature (after new weights: they were computed with the old ones)."""
        self._blocks.clear()
        self._free = list(range(self.capacity))
        self._pins.clear()
        self._images.clear()
        self._image_used = 0

    @property
    def pinned(self) -> int:
        """Blocks a prefill in flight holds (none between requests)."""
        return sum(1 for n in self._pins.values() if n > 0)

    @staticmethod
    def conversation_gb(model: IdeficsModel, limit: float = 1.0) -> float:
        """GiB of keys and values of one conversation as long as the model's positions, at most `limit`."""
        c = model.config.text
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim * jnp.dtype(model.dtype).itemsize
        return min(limit, (c.max_position_embeddings + BLOCK) * per_token / GiB)

    @property
    def scratch(self) -> int:
        return self.capacity

    # ---- keys -------------------------------------------------------------------------------------------------
    def row(self, prompt: Prompt, b: int) -> Row:
        """Row b of a prepared prompt batch: its real tokens, its real image tiles and its block keys."""
        ids = prompt.ids[b][prompt.mask[b] == 1].astype(np.int32)
        tiles = []
        if prompt.pixel_values is not None:
            pv, pm = prompt.pixel_values[b], None if prompt.pixel_mask is None else prompt.pixel_mask[b]
            for i in np.flatnonzero(np.any(pv.reshape(pv.shape[0], -1) != 0, axis=1)):
                m = None if pm is None else np.ascontiguousarray(pm[i])
                px = np.ascontiguousarray(pv[i])
                key = _digest(str((px.shape, px.dtype.str)).encode(), px.tobytes(),
                              b"" if m is None else m.astype(np.uint8).tobytes())
                tiles.append(Tile(key, px, m))
        row = Row(ids, len(ids), tiles, [])
        row.keys = self._keys(ids, tiles, [])
        return row

    def _keys(self, ids: np.ndarray, tiles: list[Tile], keys: list[bytes]) -> list[bytes]:
        """`keys` continued over the full blocks of `ids` they do not cover yet."""
        config = self.model.config
        is_img = ids == config.image_token_id
        tile = np.where(is_img, (np.cumsum(is_img) - 1) // config.image_seq_len, -1)
        keys = list(keys)
        for j in range(len(keys), len(ids) // BLOCK):
            span = slice(j * BLOCK, (j + 1) * BLOCK)
            held = [tiles[t].key for t in np.unique(tile[span]) if t >= 0]
            keys.append(_digest(keys[-1] if keys else b"", ids[span].tobytes(), *held))
        return keys

    def extend(self, row: Row, tokens) -> None:
        """Adds answer tokens (those whose keys and values were computed: all but the last one produced) to
        `row`; an image token ends them (in an answer it has no image behind it)."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        img = np.flatnonzero(tokens == self.model.config.image_token_id)
        tokens = tokens[:img[0]] if len(img) else tokens
        row.ids = np.concatenate([row.ids, tokens])
        row.keys = self._keys(row.ids, row.tiles, row.keys)

    # ---- the pool ---------------------------------------------------------------------------------------------
    def match(self, row: Row) -> None:
        """Finds `row`'s longest cached prefix (leaving its last token to run) and pins its blocks until
        `release` (`prefill` releases them)."""
        hit = []
        if self.pool is not None:
            for key in row.keys[:(row.prompt_len - 1) // BLOCK]:
                if key not in self._blocks:
                    break
                hit.append(self._blocks[key])
            for key in reversed(row.keys[:len(hit)]):  # the root most recent: chains lose their tails first
                self._blocks.move_to_end(key)
        self.release(row)
        row.hit, row.pinned = hit, True
        self._pins.update(hit)

    def release(self, row: Row) -> None:
        """Unpins `row`'s cached prefix, if pinned."""
        if row.pinned:
            self._unpin(row.hit)
            row.pinned = False

    def _unpin(self, blocks: list[int]) -> None:
        self._pins.subtract(blocks)
        self._pins += collections.Counter()  # drops zero counts

    def fit(self, row: Row, columns: int) -> None:
        """Shortens `row`'s pinned prefix until its layout (`shape`: cached blocks and the rest, each bucketed) has
        at most `columns` columns: a prefix cut to a bucket's size pads nothing. With none left the prompt runs
        whole, which fits wherever the request was admitted."""
        while row.hit:
            blocks, rest = self.shape([row])
            if blocks * BLOCK + rest <= columns:
                return
            n = len(row.hit)
            keep = max((b for b in (bucket(k, 1) for k in range(1, n)) if b < n), default=0)
            dropped, row.hit = row.hit[keep:], row.hit[:keep]
            if row.pinned:
                self._unpin(dropped)

    def _allocate(self, busy: set[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for key, blk in self._blocks.items():
            if not self._pins[blk] and blk not in busy:
                del self._blocks[key]
                self.stats["evicted"] += 1
                return blk
        return None

    def keep(self, cache: KVCache, index: int, row: Row, cols: np.ndarray) -> None:
        """Keeps `row`'s full blocks not cached yet whose tokens' keys and values lie in row `index` of `cache`:
        token p in column cols[p] (-1: overwritten since; the blocks from there on are not kept)."""
        if self.pool is None:
            return
        new, busy = [], set()
        for j, key in enumerate(row.keys):
            if key in self._blocks:
                continue
            c = cols[j * BLOCK:(j + 1) * BLOCK]
            if len(c) < BLOCK or (c < 0).any():
                break
            blk = self._allocate(busy)
            if blk is None:
                break
            busy.add(blk)
            self._blocks[key] = blk
            new.append((blk, c))
        for key in reversed(row.keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)
        if not new:
            return
        n = 1 << (len(new) - 1).bit_length()  # powers of two: few programs
        dst = np.full(n, self.scratch, np.int32)
        src = np.zeros((n, BLOCK), np.int32)
        for i, (blk, c) in enumerate(new):
            dst[i], src[i] = blk, c
        self.pool = _store(self.pool, cache, jnp.int32(index), jnp.asarray(src), jnp.asarray(dst))

    # ---- images -----------------------------------------------------------------------------------------------
    def features(self, core: Core, tiles: list[Tile]) -> list[jax.Array]:
        """Each tile's image features (Ti, D): cached, else encoded (tiles of one shape together) and kept."""
        found: dict[bytes, jax.Array] = {}
        todo: dict[tuple, list[Tile]] = {}
        for t in tiles:
            if t.key in found:
                continue
            if t.key in self._images:
                self._images.move_to_end(t.key)
                found[t.key] = self._images[t.key]
                self.stats["image_hits"] += 1
            elif not any(t.key == u.key for u in todo.get((t.pixels.shape, t.mask is None), ())):
                todo.setdefault((t.pixels.shape, t.mask is None), []).append(t)
        for group in todo.values():
            self.stats["image_misses"] += len(group)
            n = bucket(len(group), 1)
            pad = lambda xs: np.stack(xs + [np.zeros_like(xs[0])] * (n - len(xs)))  # noqa: E731
            masks = None if group[0].mask is None else pad([t.mask for t in group])
            feats = core.encode_images(pad([t.pixels for t in group]), masks)
            for i, t in enumerate(group):
                found[t.key] = feats[i]
                self._keep_image(t.key, feats[i])
        return [found[t.key] for t in tiles]

    def _keep_image(self, key: bytes, f: jax.Array) -> None:
        if f.nbytes > self.image_bytes:
            return
        self._images[key] = f
        self._image_used += f.nbytes
        while self._image_used > self.image_bytes:
            _, old = self._images.popitem(last=False)
            self._image_used -= old.nbytes

    # ---- running prompts ----------------------------------------------------------------------------------------
    @staticmethod
    def shape(rows: list[Row]) -> tuple[int, int]:
        """(cached blocks, rest columns) of these rows run together: their cache has BLOCK * blocks + rest
        columns."""
        n = max(len(r.hit) for r in rows)
        return (bucket(n, 1) if n else 0), bucket(max(r.prompt_len - r.cached for r in rows))

    def prefill(self, core: Core, rows: list[Row], sampling: Rows, allowed_BW=None) -> Prefilled:
        """Runs the rows' prompts past their cached prefixes (`match`ed) and releases the prefixes (`allowed_BW`:
        the first tokens' packed masks, as `Core.prefill` takes them). A row may
        repeat (a batch padded to a bucket). Their new blocks are `keep`'s to keep, once they are in the decode
        state (whose shape does not change: fewer programs)."""
        config = self.model.config
        N, T = self.shape(rows)
        B, Ti = len(rows), config.image_seq_len
        blocks = np.full((B, N), self.scratch, np.int32)
        pmask = np.zeros((B, N * BLOCK), np.int32)
        fill = 0 if config.image_token_id != 0 else 1
        ids = np.full((B, T), fill, np.int32)
        mask = np.zeros((B, T), np.int32)
        offsets = np.zeros(B, np.int32)
        feats = []
        for b, r in enumerate(rows):
            h, P = len(r.hit), r.cached
            if h:
                blocks[b, N - h:] = r.hit
                pmask[b, N * BLOCK - P:] = 1
            rest = r.ids[P:r.prompt_len]
            ids[b, :len(rest)], mask[b, :len(rest)] = rest, 1
            before = int((r.ids[:P] == config.image_token_id).sum())
            first = before // Ti
            offsets[b] = before - first * Ti
            needed = r.tiles[first:] if (rest == config.image_token_id).any() else []
            feats.append(self.features(core, needed))
        feats_BITD = None
        if any(feats):
            I = bucket(max(len(f) for f in feats), 1)
            zero = jnp.zeros_like(next(f for f in feats if f)[0])
            feats_BITD = jnp.stack([jnp.stack(f + [zero] * (I - len(f))) for f in feats])
        pool = self.pool if self.pool is not None else KVCache.zeros(config.text, 1, BLOCK, self.model.dtype)
        try:
            cache, first, done = core.prefill_after(pool, blocks, pmask, ids, mask, feats_BITD,
                                                    offsets if feats_BITD is not None else None, sampling,
                                                    allowed_BW)
        finally:
            for r in rows:
                self.release(r)
        start = N * BLOCK - np.asarray([r.cached for r in rows])
        for r in {id(r): r for r in rows}.values():  # a batch may be padded with repeats of a row
            self.stats["prompt_tokens"] += r.prompt_len
            self.stats["cached_tokens"] += r.cached
        return Prefilled(cache, np.concatenate([pmask, mask], axis=1), start, np.asarray(first), np.asarray(done))
