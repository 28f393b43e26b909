"""Vision Transformer for faces, as insightface's arcface_torch defines it (``vit_t`` ... ``vit_l``).

112x112 images are cut into 9x9 patches by a stride-9 convolution (12 x 12 = 144 tokens;
the last 4 pixel rows and columns are never seen), a learned position embedding is
added, then pre-LayerNorm blocks of multi-head self-attention (no qkv bias) and an MLP
whose activation is ReLU6 (not GELU), each with a per-sample drop path. There is no
class token: after a final LayerNorm all tokens are flattened, token-major, into one
``tokens x D`` vector and the embedding head is Linear -> BatchNorm1d -> Linear ->
BatchNorm1d (no biases, BatchNorm eps 2e-5).

Training-only patch dropout (``mask_ratio``): each image keeps a random
``int(tokens * (1 - mask_ratio))`` of its tokens through the blocks; after the final
LayerNorm the dropped positions are filled with a learned ``mask_token`` (not normalized)
so the flattened head sees every position. arcface_torch's code drops 10 % of the tokens
whenever its ``mask_ratio`` is above zero (it never passes the ratio on), so its
``*_mask_005`` presets drop 10 %; here ``mask_ratio`` is the fraction dropped, and the
presets that mask use 0.1, which is what arcface_torch trains.

Attention logits and their softmax are computed in float32 whatever the compute dtype,
as arcface_torch does under mixed precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pfc_jax.models.layers import batch_norm

# arcface_torch's BatchNorm1d layers of the embedding head use eps 2e-5; LayerNorm 1e-5.
HEAD_BN_EPSILON = 2e-5
LN_EPSILON = 1e-5

_linear_init = nnx.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


def _linear(cin: int, cout: int, *, bias: bool = True, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(cin, cout, use_bias=bias, kernel_init=_linear_init, dtype=dtype, rngs=rngs)


def drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Per-sample stochastic depth: each sample's residual branch is dropped with
    probability ``rate`` and the kept ones scaled by ``1 / (1 - rate)``."""
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention: one qkv projection without bias (rows q, k, v, each
    head-major), scaled dot products and softmax in float32, an output projection."""

    def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = _linear(dim, 3 * dim, bias=False, dtype=dtype, rngs=rngs)
        self.proj = _linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        h = self.num_heads
        q, k, v = jnp.moveaxis(self.qkv(x).reshape(b, n, 3, h, d // h), 2, 0)  # [b, n, h, hd] each
        scores = jnp.einsum("bnhc,bmhc->bhnm", q, k, preferred_element_type=jnp.float32) * (d // h) ** -0.5
        weights = jax.nn.softmax(scores, axis=-1)
        out = jnp.einsum("bhnm,bmhc->bnhc", weights, v.astype(jnp.float32)).astype(x.dtype)
        return self.proj(out.reshape(b, n, d))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: attention and a ReLU6 MLP, each residual with drop path."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: int, drop_path: float, dtype, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=LN_EPSILON, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=LN_EPSILON, dtype=dtype, rngs=rngs)
        self.fc1 = _linear(dim, mlp_ratio * dim, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(mlp_ratio * dim, dim, dtype=dtype, rngs=rngs)
        self.drop_path = drop_path

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, keys[0])
        mlp = self.fc2(jax.nn.relu6(self.fc1(self.norm2(x))))
        return x + drop_path(mlp, self.drop_path, keys[1])


class VisionTransformer(nnx.Module):
    """[N, H, W, 3] -> [N, embedding_dim]; see the module docstring.

    Args:
      embed_dim, depth, num_heads: width, blocks and heads of the transformer.
      patch_size: side of the square patches (stride = size, no padding).
      mlp_ratio: hidden width of the MLP over ``embed_dim``.
      drop_path_rate: stochastic depth of the last block (block i: ``rate * i / (depth - 1)``).
      mask_ratio: fraction of the tokens each image drops in training (0: none).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        patch_size: int = 9,
        mlp_ratio: int = 4,
        drop_path_rate: float = 0.0,
        mask_ratio: float = 0.0,
        embedding_dim: int = 512,
        image_size: int = 112,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if image_size < patch_size:
            raise ValueError(f"image size {image_size} is smaller than the patch size {patch_size}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        side = image_size // patch_size
        self.num_tokens = side * side
        self.mask_ratio = mask_ratio
        self.patch_embed = nnx.Conv(
            3,
            embed_dim,
            (patch_size, patch_size),
            strides=(patch_size, patch_size),
            padding="VALID",
            dtype=dtype,
            rngs=rngs,
        )
        self.pos_embed = nnx.Param(_linear_init(rngs.params(), (1, self.num_tokens, embed_dim), jnp.float32))
        self.mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, embed_dim), jnp.float32))
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nnx.List(
            [Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, drop_path=rate, dtype=dtype, rngs=rngs) for rate in rates]
        )
        self.norm = nnx.LayerNorm(embed_dim, epsilon=LN_EPSILON, dtype=dtype, rngs=rngs)
        self.feature = _linear(self.num_tokens * embed_dim, embed_dim, bias=False, dtype=dtype, rngs=rngs)
        self.feature_bn = batch_norm(embed_dim, epsilon=HEAD_BN_EPSILON, dtype=dtype, rngs=rngs)
        self.embedding = _linear(embed_dim, embedding_dim, bias=False, dtype=dtype, rngs=rngs)
        self.embedding_bn = batch_norm(embedding_dim, epsilon=HEAD_BN_EPSILON, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        key = dropout_key if train else None
        x = self.patch_embed(x)
        b, _, _, d = x.shape
        x = x.reshape(b, self.num_tokens, d) + self.pos_embed[...].astype(x.dtype)
        masked = key is not None and self.mask_ratio > 0.0
        if masked:
            key, mask_key = jax.random.split(key)
            x, restore = self._keep_random_tokens(x, mask_key)
        keys = [None] * len(self.blocks) if key is None else list(jax.random.split(key, len(self.blocks)))
        for block, k in zip(self.blocks, keys):
            x = block(x, k)
        x = self.norm(x)
        if masked:
            mask = jnp.broadcast_to(self.mask_token[...].astype(x.dtype), (b, self.num_tokens - x.shape[1], d))
            x = jnp.take_along_axis(jnp.concatenate([x, mask], axis=1), restore[:, :, None], axis=1)
        x = self.feature_bn(self.feature(x.reshape(b, -1)), use_running_average=not train)
        return self.embedding_bn(self.embedding(x), use_running_average=not train)

    def _keep_random_tokens(self, x: jax.Array, key: jax.Array):
        """Each image's ``int(tokens * (1 - mask_ratio))`` tokens of lowest random noise (in
        that order), and for every position where it goes back among kept + dropped."""
        keep = int(self.num_tokens * (1.0 - self.mask_ratio))
        noise = jax.random.uniform(key, x.shape[:2])
        shuffle = jnp.argsort(noise, axis=1)
        restore = jnp.argsort(shuffle, axis=1)
        return jnp.take_along_axis(x, shuffle[:, :keep, None], axis=1), restore
