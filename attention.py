"""
The attention of the attentive VAE (Apostolopoulou et al., "Deep Attentive Variational Inference",
ICLR 2022), as the official code computes it (ifiaposto/Deep_Attentive_VI src/layers/attention.py
and src/model/variational_layer.py; ../shared/ATTENTIVE.md sections 1.5 to 1.7 and 3). nvae.py
wires it into the network.

- Depth-wise attention (inter-layer couplings): at every pixel, layer l attends over the contexts
  of all earlier layers to condition its prior (DecoderAttention), and over the encoder features
  closer to the data to form its posterior (EncoderAttention).
- The non-local block (intra-layer couplings): attention over all positions of one feature map
  (Wang et al. 2018), in every node of the residual towers.
Every attention output enters through a gate initialised to 0, so training starts as the NVAE
baseline.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import WNConv2d


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of every pixel: (B, C, H, W) -> (B, C, H, W)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def depth_attention(query, keys, values, scale):
    """Single-head attention over depth, separately at every pixel, no 1/sqrt(d), no mask.
    query (B, d, H, W), keys (B, J, d, H, W), values (B, J, C, H, W)
    -> sum_j alpha_j values_j (B, C, H, W) and alpha (B, J, H, W), alpha_j = softmax_j(a q . k_j)."""
    alpha = torch.softmax(scale * (query.unsqueeze(1) * keys).sum(2), dim=1)   # (B, J, H, W)
    return (alpha.unsqueeze(2) * values).sum(1), alpha



def residual_norm(norm, y):
    """R(y) = y + GELU(LayerNorm(y)); official: tfa.activations.gelu, approximate (tanh) by default."""
    return y + F.gelu(norm(y), approximate='tanh')


def attend(q, k, v):
    """softmax(q k^T) v, no 1/sqrt(d): (B, N, k), (B, N, k), (B, N, C) -> (B, N, C). On CUDA one fused
    kernel (no N x N matrix kept); on CPU, where SDPA's fused kernels need q, k and v of one width and
    its fallback adds a masked-row check, the plain product: the same numbers, 1.2-1.4x faster."""
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, scale=1.0)
    return torch.softmax(q @ k.transpose(1, 2), -1) @ v


class NonLocalBlock(nn.Module):
    """official: NonlocalResNetBlock (use_layer_norm and subsample off). Over the N = H W positions
    of one image: y_n = sum_m softmax_m(a q_n . k_m) v_m, output x + gamma * y; q, k: 1x1
    weight-normalised convs to key_width, v: C -> C, all with bias; no 1/sqrt(d); a (trained)
    starts at 1, gamma at 0. `bias` False where the official block inherits use_bias False (the
    upsampling shortcut's)."""

    def __init__(self, channels, key_width, bias=True):
        super().__init__()
        self.query = WNConv2d(channels, key_width, bias=bias)
        self.key = WNConv2d(channels, key_width, bias=bias)
        self.value = WNConv2d(channels, channels, bias=bias)
        self.scale = nn.Parameter(torch.ones(()))   # official: _alignment_function.scale
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        B, C, H, W = x.shape
        q = self.query(x).flatten(2).transpose(1, 2) * self.scale   # (B, N, k)
        k = self.key(x).flatten(2).transpose(1, 2)                  # (B, N, k)
        v = self.value(x).flatten(2).transpose(1, 2)                # (B, N, C)
        y = attend(q, k, v)                                         # (B, N, C)
        return x + self.gamma * y.transpose(1, 2).reshape(B, C, H, W)


def depth_scale(trainable):
    """The depth-wise attention's scale a. official oddity: under TF 2.3 `DepthWiseAttention` is a
    tf.Module whose SoftmaxAlignment scale Keras does not track, so it stays 1 (ATTENTIVE.md 1.6);
    `trainable` makes it a parameter (as TF 2.15 would, still unregularised)."""
    return nn.Parameter(torch.ones(())) if trainable else 1.0


class DecoderAttention(nn.Module):
    """The prior side of layer i >= 1 (official: VariationalLayer.call_decoder). Contexts c_j
    (B, S + K, H, W) of the layers j < i are read as value (first S channels) and key (last K).
    With LayerNorms: s <- R(s); the newest context's value gets a plain LayerNorm (its key stays
    raw; the older ones were normalised by the model's own LayerNorms, nvae.py); A = depth-wise
    attention(query, keys, values); A <- R(A). Prior input = s + gate * A (gate starts at 0)."""

    def __init__(self, width, layer_norm=True, trainable_scale=False):
        super().__init__()
        self.width, self.layer_norm = width, layer_norm
        if layer_norm:
            self.context_norm = ChannelNorm(width)     # official: _ctx_layer_norm_layer
            self.newest_norm = ChannelNorm(width)      # official: _attention_layer_norm_layer
            self.attended_norm = ChannelNorm(width)    # official: _attention_layer_norm_layer2
        self.gate = nn.Parameter(torch.zeros(()))      # official: _gamma
        self.scale = depth_scale(trainable_scale)

    def forward(self, s, query, contexts):
        """s (B, S, H, W), query (B, K, H, W), contexts: list of (B, S + K, H, W), oldest first
        -> (s, the state passed on as context; the prior's input), both (B, S, H, W)"""
        values = [c[:, :self.width] for c in contexts]
        keys = torch.stack([c[:, self.width:] for c in contexts], 1)          # (B, i, K, H, W)
        if self.layer_norm:
            s = residual_norm(self.context_norm, s)
            values[-1] = self.newest_norm(values[-1])   # official oddity: only the newest value, its key raw (ATTENTIVE.md 8.6)
        attended, _ = depth_attention(query, keys, torch.stack(values, 1), self.scale)   # (B, S, H, W)
        if self.layer_norm:
            attended = residual_norm(self.attended_norm, attended)
        return s, s + self.gate * attended


class EncoderAttention(nn.Module):
    """The posterior side (official: VariationalLayer.infer). The layer's own encoder feature
    (merged with the prior input for i >= 1) and the features closer to the data, each read as
    value (first V channels) and key (last K); the query is the first K channels of the decoder
    state. B = depth-wise attention over them (own entry first), with LayerNorms B <- R(B) and
    u <- R(u); h = u + gate * B. No LayerNorm on the features themselves."""

    def __init__(self, width, layer_norm=True, trainable_scale=False):
        super().__init__()
        self.width, self.layer_norm = width, layer_norm
        if layer_norm:
            self.feature_norm = ChannelNorm(width)     # official: _cond_attention_layer_norm_layer
            self.attended_norm = ChannelNorm(width)    # official: _encoder_attention_layer_norm_layer
        self.gate = nn.Parameter(torch.zeros(()))      # official: _encoder_gamma
        self.scale = depth_scale(trainable_scale)

    def forward(self, query, u, key, closer):
        """query (B, K, H, W); u (B, V, H, W) and key (B, K, H, W): the own entry; closer: list of
        encoder features (B, V + K, H, W) -> h (B, V, H, W)"""
        values = torch.stack([u] + [f[:, :self.width] for f in closer], 1)    # (B, n, V, H, W)
        keys = torch.stack([key] + [f[:, self.width:] for f in closer], 1)    # (B, n, K, H, W)
        attended, _ = depth_attention(query, keys, values, self.scale)
        if self.layer_norm:
            attended = residual_norm(self.attended_norm, attended)
            u = residual_norm(self.feature_norm, u)
        return u + self.gate * attended
