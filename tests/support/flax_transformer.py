"""Small flax transformers (NNX and Linen), random weights, for the adapter tests.

Both are decoder-only: token embedding, pre-norm blocks (RMSNorm -> causal multi-head attention ->
residual, RMSNorm -> MLP -> residual), final RMSNorm, unembedding. Submodule outputs:
`layers[l]` (Linen `layers_l`) is the residual after block l, `layers[l].attn` the attention output,
`layers[l].mlp` the MLP output.
"""
import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

VOCAB, D, HEADS, D_MLP, LAYERS = 50, 16, 4, 32, 2


def causal_mask(tokens):
    return nn.make_causal_mask(tokens)            # [batch, 1, seq, seq]


class MLP(nnx.Module):
    def __init__(self, d: int, d_mlp: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(d, d_mlp, rngs=rngs)
        self.down = nnx.Linear(d_mlp, d, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, d_mlp: int, rngs: nnx.Rngs):
        self.ln1 = nnx.RMSNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False, rngs=rngs)
        self.ln2 = nnx.RMSNorm(d, rngs=rngs)
        self.mlp = MLP(d, d_mlp, rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.mlp(self.ln2(x))


class Transformer(nnx.Module):
    """NNX: `model(tokens [batch, seq]) -> logits [batch, seq, vocab]`."""

    def __init__(self, rngs: nnx.Rngs, *, vocab: int = VOCAB, d: int = D, heads: int = HEADS, d_mlp: int = D_MLP,
                 layers: int = LAYERS):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.layers = nnx.List([Block(d, heads, d_mlp, rngs) for _ in range(layers)])
        self.ln_f = nnx.RMSNorm(d, rngs=rngs)
        self.unembed = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        mask = causal_mask(tokens)
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, mask)
        return self.unembed(self.ln_f(x))


def nnx_transformer(seed: int = 0, **kw) -> Transformer:
    """A random NNX transformer; norm scales are perturbed away from 1 so they matter."""
    model = Transformer(nnx.Rngs(seed), **kw)
    key = jax.random.PRNGKey(seed + 100)
    for path, m in nnx.iter_modules(model):
        if isinstance(m, nnx.RMSNorm):
            key, sub = jax.random.split(key)
            m.scale.value = 1.0 + 0.3 * jax.random.normal(sub, m.scale.value.shape)
    return model


class LinenMLP(nn.Module):
    d: int
    d_mlp: int

    def setup(self):
        self.up = nn.Dense(self.d_mlp)
        self.down = nn.Dense(self.d)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class LinenBlock(nn.Module):
    d: int
    heads: int
    d_mlp: int

    def setup(self):
        self.ln1 = nn.RMSNorm()
        self.attn = nn.MultiHeadDotProductAttention(num_heads=self.heads)
        self.ln2 = nn.RMSNorm()
        self.mlp = LinenMLP(self.d, self.d_mlp)

    def __call__(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, mask=mask)
        return x + self.mlp(self.ln2(x))


class LinenTransformer(nn.Module):
    """Linen: `model.apply(variables, tokens) -> logits`; blocks are `layers_0`, `layers_1`, ..."""

    vocab: int = VOCAB
    d: int = D
    heads: int = HEADS
    d_mlp: int = D_MLP
    n_layers: int = LAYERS

    def setup(self):
        self.embed = nn.Embed(self.vocab, self.d)
        self.layers = [LinenBlock(self.d, self.heads, self.d_mlp) for _ in range(self.n_layers)]
        self.ln_f = nn.RMSNorm()
        self.unembed = nn.Dense(self.vocab, use_bias=False)

    def __call__(self, tokens):
        mask = causal_mask(tokens)
        x = self.embed(tokens)
        for block in self.layers:
            x = block(x, mask)
        return self.unembed(self.ln_f(x))


def linen_transformer(seed: int = 0):
    """(module, variables) of a random Linen transformer, norm scales perturbed away from 1."""
    module = LinenTransformer()
    variables = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves)))
    perturbed = [1.0 + 0.3 * jax.random.normal(next(keys), x.shape) if str(path[-1]) == "['scale']" else x
                 for path, x in leaves]
    return module, jax.tree_util.tree_unflatten(treedef, perturbed)
