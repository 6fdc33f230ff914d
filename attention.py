"""
The attentive VAE's couplings (Apostolopoulou et al., "Deep Attentive Variational Inference",
ICLR 2022), on top of the very deep VAE backbone in model.py. Facts: ../shared/DESIGN.md section 2.

- Depth-wise attention (inter-layer couplings): at every pixel, layer l attends over the contexts
  of all earlier layers to condition its prior (sec. 2.2), and over encoder features closer to the
  data to form its posterior (sec. 2.3). Eq. (4): [c_l, s_l, k_l] = T_l(z_{l-1} + c_{l-1}): every
  layer emits a context c, a query s and a key k.
- The non-local block (intra-layer couplings): attention over all positions of one feature map
  (sec. 2.4, Wang et al. 2018).
Every attention output enters through a gate initialised to 0, so training starts as the local model.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import WNConv2d, conv, upsample


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of every pixel: (B, C, H, W) -> (B, C, H, W)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ResidualNorm(nn.Module):
    """y + GELU(LayerNorm(y)), the normalisation of an attended output and of the own context."""

    def __init__(self, channels):
        super().__init__()
        self.norm = ChannelNorm(channels)

    def forward(self, y):
        return y + F.gelu(self.norm(y))


def depth_attention(query, keys, values, scale):
    """Single-head attention over depth, separately at every pixel, no 1/sqrt(d), no mask.
    query (B, d, H, W), keys (B, J, d, H, W), values (B, J, C, H, W)
    -> sum_j alpha_j values_j (B, C, H, W) and alpha (B, J, H, W), alpha_j = softmax_j(a q . k_j)."""
    alpha = torch.softmax(scale * (query.unsqueeze(1) * keys).sum(2), dim=1)   # (B, J, H, W)
    return (alpha.unsqueeze(2) * values).sum(1), alpha


class DepthMemory:
    """The (LayerNormed) contexts and keys of the layers decoded so far. Entries of a coarser
    resolution are nearest-upsampled once the decoder reaches a finer one."""

    def __init__(self):
        self.contexts, self.keys = [], []

    def __len__(self):
        return len(self.contexts)

    def at(self, res):
        """Bring every entry to resolution `res` (nearest upsampling, once per resolution)."""
        if self.contexts and self.contexts[0].shape[-1] != res:
            self.contexts = [upsample(c, res) for c in self.contexts]
            self.keys = [upsample(k, res) for k in self.keys]
        return self

    def add(self, context, key):
        self.at(context.shape[-1])
        self.contexts.append(context)
        self.keys.append(key)

    def stacked(self, res):
        """-> contexts (B, J, C, res, res), keys (B, J, d, res, res)"""
        self.at(res)
        return torch.stack(self.contexts, 1), torch.stack(self.keys, 1)


class PriorAttention(nn.Module):
    """Sec. 2.2. A_l = sum_{j<l} alpha_lj c_j with alpha_lj = softmax_j(a_l s_l . k_j);
    prior input = norm(c_l) + gamma_l * norm(A_l); a_l starts at 1, the gate gamma_l at 0."""

    def __init__(self, width, key_width, first=False, last=False):
        super().__init__()
        if not first:                                 # layer 0 has nothing to attend to
            self.scale = nn.Parameter(torch.ones(()))     # a_l
            self.gate = nn.Parameter(torch.zeros(()))     # gamma_l
            self.norm_attended = ResidualNorm(width)
        self.norm_context = ResidualNorm(width)
        if not last:                                  # no layer reads the last layer's entry
            self.enter_context = ChannelNorm(width)   # c_l and k_l are normalised once, entering the memory
            self.enter_key = ChannelNorm(key_width)

    def forward(self, context, query, memory, attend=True):
        """context c_l (B, w, H, W), query s_l (B, d, H, W) -> the prior's input (B, w, H, W)"""
        prior_in = self.norm_context(context)
        if attend and len(memory):            # the memory holds layers j < l only: not l's own key
            contexts, keys = memory.stacked(context.shape[-1])
            attended, _ = depth_attention(query, keys, contexts, self.scale)
            prior_in = prior_in + self.gate * self.norm_attended(attended)
        return prior_in

    def remember(self, memory, context, key):
        memory.add(self.enter_context(context), self.enter_key(key))


class PosteriorAttention(nn.Module):
    """Sec. 2.3. u_l = W_a e_l + W_b (prior input) takes the place of e_l in the sequence of encoder
    features e_l, e_{l+1}, ... (closer to the data); B_l = sum_m beta_lm v_m with
    beta_lm = softmax_m(a'_l r_l . kappa_m), r_l the first d channels of the decoder context;
    h_l = u_l + gamma'_l norm(B_l); a 3x3 conv on h_l gives the posterior's offsets from the prior."""

    def __init__(self, width, key_width, zdim, res):
        super().__init__()
        self.width, self.key_width = width, key_width
        self.merge_feature = conv(width + key_width, width + key_width, 1)   # W_a
        self.merge_prior = conv(width, width + key_width, 1)                 # W_b
        self.scale = nn.Parameter(torch.ones(()))     # a'_l
        self.gate = nn.Parameter(torch.zeros(()))     # gamma'_l
        self.norm = ResidualNorm(width)
        self.delta = conv(width, 2 * zdim, 3 if res > 2 else 1)

    def forward(self, feature, closer, prior_in, context, attend=True):
        """feature e_l (B, w + d, H, W); closer: (values (B, J, w, H, W), keys (B, J, d, H, W)) of
        the features closer to the data, or None -> offsets (delta_mean, delta_logsigma) (B, z, H, W)"""
        u = self.merge_feature(feature) + self.merge_prior(prior_in)      # (B, w + d, H, W)
        h = u[:, :self.width]
        if attend:
            values, keys = u[:, :self.width].unsqueeze(1), u[:, self.width:].unsqueeze(1)
            if closer is not None:
                values, keys = torch.cat([values, closer[0]], 1), torch.cat([keys, closer[1]], 1)
            attended, _ = depth_attention(context[:, :self.key_width], keys, values, self.scale)
            h = h + self.gate * self.norm(attended)
        return self.delta(h).chunk(2, 1)


class NonLocal(nn.Module):
    """Sec. 2.4. y = x + gamma * sum_m softmax_m(a q_n . k_m) v_m over all H*W positions of one
    image; q, k: 1x1 convs to key_width channels, v keeps the channels; a starts at 1, gamma at 0."""

    def __init__(self, channels, key_width):
        super().__init__()
        self.query = conv(channels, key_width, 1)
        self.key = conv(channels, key_width, 1)
        self.value = conv(channels, channels, 1)
        self.scale = nn.Parameter(torch.ones(()))
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        B, C, H, W = x.shape
        q = self.query(x).flatten(2).transpose(1, 2) * self.scale   # (B, HW, k)
        k = self.key(x).flatten(2).transpose(1, 2)                  # (B, HW, k)
        v = self.value(x).flatten(2).transpose(1, 2)                # (B, HW, C)
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)      # (B, HW, C)
        return x + self.gate * y.transpose(1, 2).reshape(B, C, H, W)


# -----------------------------------------------------------------------------
# the official attentive VAE's attention (ifiaposto/Deep_Attentive_VI src/layers/attention.py and
# src/model/variational_layer.py; ../shared/ATTENTIVE.md sections 1.5 to 1.7 and 3), used by nvae.py

def residual_norm(norm, y):
    """R(y) = y + GELU(LayerNorm(y)); official: tfa.activations.gelu, approximate (tanh) by default."""
    return y + F.gelu(norm(y), approximate='tanh')


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
        y = F.scaled_dot_product_attention(q, k, v, scale=1.0)      # (B, N, C)
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
