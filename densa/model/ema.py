"""Multi-dimensional damped EMA (Mega, arXiv:2209.10655 §3.1) and its complex form (Megalodon CEMA, §3.1).

Per channel j and EMA dimension n (state size N = `ema_dim`):
    h_t = p ⊙ x_t + q ⊙ h_{t-1}          p = α⊙β (real),  q = 1 − α⊙δ  (CEMA: q = |1 − α⊙δ|·e^{iθ})
    y_t = Re(Σ_n γ_n h_{t,n})            γ = η / √N  (complex for CEMA)
Unrolled this is a causal convolution y = K * x with kernel K[t] = Re(Σ_n γ_n p_n q_n^t).

Three paths compute the same thing (tests/test_ema.py checks they agree to 1e-5 in fp32):
- `ema_reference`: the recurrence as a Python loop over time; the definition.
- `ema_fft`: the whole-sequence FFT convolution (training, Mega's form). Memory O(D·N·L) for the kernel.
- `ema_chunked`: FFT convolution inside chunks of length c plus a carried state between chunks
  (docs/design-notes.md, 'Chunked EMA').
  Memory O(D·N·c + B·D·L), so long sequences do not materialise a D×N×L kernel. Also the prefill path: it starts
  from any state and returns the final state.
- `ema_step`: one token of the recurrence, for decoding.
All EMA maths runs in fp32 (complex64 for CEMA) whatever the input dtype (docs/architecture.md, 'The EMA').

Shape suffixes: B batch, D channels, N EMA dims, L time, C chunks, c chunk length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class EmaCoeffs:
    """Coefficients of the recurrence, derived from the parameters once per forward."""

    p_DN: Tensor  # input weight α⊙β (fp32)
    log_q_DN: Tensor  # log of the decay q (fp32 real, or complex64 for CEMA)
    gamma_DN: Tensor  # output projection γ (fp32 real, or complex64 for CEMA)

    @property
    def state_dtype(self) -> torch.dtype:
        return self.log_q_DN.dtype

    def powers(self, exponents: Tensor) -> Tensor:
        """q^e for each exponent: (D, N, len(e)), complex for CEMA (from `power_parts`)."""
        re, im = self.power_parts(exponents)
        return re if im is None else torch.complex(re, im)

    def power_parts(self, exponents: Tensor) -> tuple[Tensor, Tensor | None]:
        """q^e for each exponent as real tensors (D, N, len(e)): (q^e, None) for a real q, (Re q^e, Im q^e) for CEMA.

        |q^e| is floored at e^-80 (~1e-35): below that fp32 turns subnormal and CPU exp/mul run ~20x slower,
        while the floor changes no output by more than 1e-35 × |input|. Complex q^e is built as |q|^e·e^{iθe}
        from real exp/cos/sin (`_polar_parts`): torch's complex exp is ~3x slower on CPU (and complex·real products
        would cost four real multiplies for the same values)."""
        e = exponents.float()
        abs_ = torch.exp((self.log_q_DN.real[..., None] * e).clamp_min(-80.0))
        if not self.log_q_DN.is_complex():
            return abs_, None
        return _polar_parts(abs_, self.log_q_DN.imag[..., None] * e)

    def decay(self) -> Tensor:
        """q = exp(log q): (D, N); complex q from `_polar_parts` (see `power_parts`)."""
        if not self.log_q_DN.is_complex():
            return torch.exp(self.log_q_DN)
        return torch.complex(*_polar_parts(torch.exp(self.log_q_DN.real), self.log_q_DN.imag))


def _polar_parts(abs_: Tensor, angle: Tensor) -> tuple[Tensor, Tensor]:
    """(abs·cos, abs·sin): the real and imaginary parts of torch.polar(abs_, angle). Built this way, complex(re, im)
    has the same values (within 1e-7 here) and was 2.3x faster on this CPU than torch.polar (5.7 against 2.5 ms for
    a 256 × 8 × 257 chunk's powers, one thread), where torch.polar took a fifth of a cpu-small-moe prefill."""
    return abs_ * torch.cos(angle), abs_ * torch.sin(angle)


def ema_kernel(co: EmaCoeffs, length: int, q_pow_DNL: Tensor | None = None) -> Tensor:
    """K[d, t] = Re(Σ_n γ p q^t) for t < length: (D, L), fp32. `q_pow_DNL` may pass q^t precomputed."""
    if q_pow_DNL is None:
        q_pow_DNL = co.powers(torch.arange(length, device=co.p_DN.device, dtype=torch.float32))
    return torch.einsum("dnl,dn->dl", q_pow_DNL[..., :length], (co.gamma_DN * co.p_DN).to(co.state_dtype)).real


def causal_fft_conv(x_BxL: Tensor, k_xL: Tensor) -> Tensor:
    """y[..., t] = Σ_{s<=t} k[..., t−s] x[..., s] by FFT; x and k broadcast against each other. FFT size is the
    next power of two >= 2L (pocketfft and cuFFT are slow on sizes with large prime factors; Megalodon rounds the
    same way), so the circular convolution never wraps."""
    return _CausalFFTConv.apply(x_BxL, k_xL)


class _CausalFFTConv(torch.autograd.Function):
    """The FFT convolution with a hand-written backward. Autograd's own backward of rfft runs a full complex c2c
    transform and zero-fills a padded spectrum, ~7x the forward's cost on CPU; the exact gradients are two
    cross-correlations, each one rfft/irfft pair on the same zero-padded size:
        dx[s] = Σ_t g[t] k[t−s] = irfft(G·conj(K))[s]      dk[τ] = Σ_t g[t] x[t−τ] = irfft(G·conj(X))[τ]
    (the padding to n >= 2L keeps the wrapped terms zero; broadcast dimensions are summed in the spectrum)."""

    @staticmethod
    def forward(ctx, x_BxL: Tensor, k_xL: Tensor) -> Tensor:
        L = x_BxL.shape[-1]
        n = 1 << (2 * L - 1).bit_length()
        x_f, k_f = torch.fft.rfft(x_BxL, n=n), torch.fft.rfft(k_xL, n=n)  # (..., n/2+1) complex
        ctx.save_for_backward(x_f, k_f)
        ctx.shapes = (x_BxL.shape, k_xL.shape, n, L)
        return torch.fft.irfft(x_f * k_f, n=n)[..., :L]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_BxL: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_f, k_f = ctx.saved_tensors
        x_shape, k_shape, n, L = ctx.shapes
        g_f = torch.fft.rfft(g_BxL, n=n)
        dx = dk = None
        if ctx.needs_input_grad[0]:
            dx = torch.fft.irfft((g_f * k_f.conj()).sum_to_size(*x_shape[:-1], g_f.shape[-1]), n=n)[..., :L]
        if ctx.needs_input_grad[1]:
            dk = torch.fft.irfft((g_f * x_f.conj()).sum_to_size(*k_shape[:-1], g_f.shape[-1]), n=n)[..., :L]
        return dx, dk


def ema_reference(x_BDL: Tensor, co: EmaCoeffs, state_BDN: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence, one step at a time. Returns (y (B, D, L) fp32, final state (B, D, N))."""
    B, D, L = x_BDL.shape
    q_DN = torch.exp(co.log_q_DN)
    h = state_BDN if state_BDN is not None else x_BDL.new_zeros(B, D, co.p_DN.shape[1], dtype=co.state_dtype)
    ys = []
    for t in range(L):
        h = co.p_DN * x_BDL[:, :, t, None].float() + q_DN * h
        ys.append((h * co.gamma_DN).sum(-1).real)
    return torch.stack(ys, dim=-1), h


def ema_step(x_BD: Tensor, co: EmaCoeffs, state_BDN: Tensor, q_DN: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One decoding step: h = p x + q h; y = Re(γ·h). Returns (y (B, D) fp32, new state). `q_DN` may pass the
    decay precomputed (`co.decay()`)."""
    h = torch.addcmul((co.decay() if q_DN is None else q_DN) * state_BDN, co.p_DN, x_BD[..., None].float())
    return (h * co.gamma_DN).sum(-1).real, h


def ema_fft(x_BDL: Tensor, co: EmaCoeffs) -> Tensor:
    """Whole-sequence FFT convolution from a zero state. Returns y (B, D, L) fp32."""
    return causal_fft_conv(x_BDL.float(), ema_kernel(co, x_BDL.shape[-1]))


@dataclass
class ChunkWeights:
    """What `ema_chunked` derives from the coefficients for one chunk length c (parameters only, no input).

    The state contractions run as real batched matmuls; for CEMA their complex weights are laid out here, once, as
    real (re, im) pairs over m = (n, re/im), so that no call re-lays them out: that strided copy cost as much as
    the contractions themselves (at T = 512 it was half of a cpu-small-moe EMA's time)."""

    q_pow_DNc1: Tensor  # q^0 .. q^c (complex for CEMA)
    k_Dc: Tensor  # the within-chunk kernel K[:c] (+ ω at K[0] when built with skip_D)
    w_in_DMc: Tensor  # p q^{c-1-t}: what x_i[t] adds to the state at the chunk's end; CEMA: (D, 2N, c) (Re, Im)
    w_out_DMc: Tensor  # γ q^{t+1}: what the chunk's start state adds to y_i[t]; CEMA: (D, 2N, c) (Re, −Im)


def chunk_weights(co: EmaCoeffs, c: int, skip_D: Tensor | None = None) -> ChunkWeights:
    re_DNc1, im_DNc1 = co.power_parts(torch.arange(c + 1, device=co.p_DN.device, dtype=torch.float32))
    q_pow_DNc1 = re_DNc1 if im_DNc1 is None else torch.complex(re_DNc1, im_DNc1)
    k_Dc = ema_kernel(co, c, q_pow_DNc1)
    if skip_D is not None:
        k_Dc = k_Dc + F.pad(skip_D.float()[:, None], (0, c - 1))  # K[0] += ω
    p_DN1 = co.p_DN[..., None]
    if im_DNc1 is None:
        return ChunkWeights(q_pow_DNc1, k_Dc, p_DN1 * q_pow_DNc1[..., :c].flip(-1), co.gamma_DN[..., None]
                            * q_pow_DNc1[..., 1:])
    # CEMA: p is real, γ complex; (γ q)_re = γ_re q_re − γ_im q_im, (γ q)_im = γ_re q_im + γ_im q_re
    g_re, g_im = co.gamma_DN.real[..., None], co.gamma_DN.imag[..., None]
    q_re, q_im = re_DNc1[..., 1:], im_DNc1[..., 1:]
    w_in_DMc = torch.stack([p_DN1 * re_DNc1[..., :c].flip(-1), p_DN1 * im_DNc1[..., :c].flip(-1)], 2).flatten(1, 2)
    w_out_DMc = torch.stack([g_re * q_re - g_im * q_im, -(g_re * q_im + g_im * q_re)], 2).flatten(1, 2)
    return ChunkWeights(q_pow_DNc1, k_Dc, w_in_DMc, w_out_DMc)


def ema_chunked(x_BDL: Tensor, co: EmaCoeffs, chunk: int, state_BDN: Tensor | None = None,
                skip_D: Tensor | None = None, weights: ChunkWeights | None = None) -> tuple[Tensor, Tensor]:
    """FFT convolution inside chunks plus a state carried across chunk boundaries (docs/design-notes.md, 'Chunked EMA').

    For chunk i with start state S_i:  y_i[t] = (K[:c] * x_i)[t] + Re(Σ_n γ q^{t+1} S_i)
                                       S_{i+1} = q^c S_i + Σ_t p q^{c−1−t} x_i[t]
    With `skip_D` (ω), y also gets ω ⊙ x, folded into the convolution as an extra K[0] tap so that no elementwise
    pass over (B, D, L) is needed for it. `weights` may pass `chunk_weights(co, min(chunk, L), skip_D)` precomputed.
    Returns (y (B, D, L) fp32, state after the last real token (B, D, N)).
    """
    B, D, L = x_BDL.shape
    c = min(chunk, L)
    pad = (-L) % c
    x = x_BDL.float()
    if pad:
        x = F.pad(x, (0, pad))
    C = x.shape[-1] // c
    x_BDCc = x.reshape(B, D, C, c)
    cw = weights if weights is not None else chunk_weights(co, c, skip_D)  # q^0 .. q^c etc., computed once
    q_pow_DNc1 = cw.q_pow_DNc1
    y_BDCc = causal_fft_conv(x_BDCc, cw.k_Dc[:, None, :])  # within-chunk, all chunks at once

    # what each chunk adds to the state: U_i = Σ_t p q^{c-1-t} x_i[t]
    U_BDCN = _to_states(x_BDCc, cw.w_in_DMc, co.log_q_DN.is_complex())
    q_c_DN = q_pow_DNc1[..., c]
    S = state_BDN if state_BDN is not None else x.new_zeros(B, D, co.p_DN.shape[1], dtype=co.state_dtype)
    starts = []
    for U_BDN in U_BDCN.unbind(2):  # sequential scan over chunk states: C = L/c small steps on (B, D, N) tensors
        starts.append(S)
        S = q_c_DN * S + U_BDN
    starts_BDCN = torch.stack(starts, dim=2)

    # what the state at each chunk start adds to that chunk's outputs: Re(Σ_n γ q^{t+1} S_i)
    y_BDCc = y_BDCc + _from_states(starts_BDCN, cw.w_out_DMc)
    y = y_BDCc.reshape(B, D, C * c)[..., :L]

    if pad:  # the scan ran over padding zeros at the end; recompute the last state at the true length
        r = c - pad  # p q^{r-1-t} for t < r: the last r taps of w_in
        S = q_pow_DNc1[..., r] * starts[-1] + _to_states(x_BDCc[:, :, -1:, :r], cw.w_in_DMc[..., c - r :],
                                                         co.log_q_DN.is_complex())[:, :, 0]
    return y, S


def _to_states(x_BDCt: Tensor, w_DMt: Tensor, complex_: bool) -> Tensor:
    """Σ_t x[b, d, c, t] w[d, n, t] -> (B, D, C, N), x real. With `complex_` (CEMA), w is `ChunkWeights`' (re, im)
    pair layout (D, 2N, t) and the result complex: one real batched matmul, no complex copy of x."""
    u_BDCM = torch.einsum("bdct,dmt->bdcm", x_BDCt, w_DMt)
    return torch.view_as_complex(u_BDCM.unflatten(-1, (-1, 2)).contiguous()) if complex_ else u_BDCM


def _from_states(S_BDCN: Tensor, w_DMt: Tensor) -> Tensor:
    """Re(Σ_n S[b, d, c, n] w[d, n, t]) -> (B, D, C, t), real. For complex S (CEMA), w is the (Re, −Im) pair layout
    (D, 2N, t): Re(S·w) = Re S Re w − Im S Im w, one real batched matmul over (n, re/im) pairs."""
    if S_BDCN.is_complex():
        S_BDCN = torch.view_as_real(S_BDCN.contiguous()).flatten(-2)  # m = (n, re/im)
    return torch.einsum("bdcm,dmt->bdct", S_BDCN, w_DMt)


def swap_time_channels(x_BMN: Tensor) -> Tensor:
    """(B, M, N) -> (B, N, M), contiguous. On CPU both directions (forward and backward) are copied as 2-D
    transposes, which torch's copy kernel does blockwise: a 3-D permute-copy, or an elementwise op mixing the two
    layouts, runs ~3-10x slower there. The EMA runs time-last, the rest of the layer channels-last."""
    return _SwapLastTwo.apply(x_BMN)


def _transposed_copy(x_BMN: Tensor) -> Tensor:
    if x_BMN.device.type != "cpu":
        return x_BMN.mT.contiguous()
    out_BNM = x_BMN.new_empty(x_BMN.shape[0], x_BMN.shape[2], x_BMN.shape[1])
    for b in range(x_BMN.shape[0]):
        out_BNM[b].copy_(x_BMN[b].mT)
    return out_BNM


class _SwapLastTwo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BMN: Tensor) -> Tensor:
        return _transposed_copy(x_BMN)

    @staticmethod
    def backward(ctx, g_BNM: Tensor) -> Tensor:
        return _transposed_copy(g_BNM)


class DampedEMA(nn.Module):
    """Learned multi-dimensional damped EMA over time, with Mega's per-channel skip: out = EMA(x) + ω ⊙ x.

    Parameter names, the paper's (fairseq and HF use other names for α/δ; docs/design-notes.md, 'EMA parameter
    names and initialisation'):
      alpha  (D, N)   α logits, input weight; sigmoid → (0, 1)
      delta  (D, N)   δ logits, damping;      sigmoid → (0, 1)
      beta   (D, N)   β expansion (real EMA only; CEMA absorbs it into complex γ)
      gamma  (D, N)   η projection, or (D, N, 2) real/imag for CEMA
      omega  (D,)     skip weight ω
      theta  (D, 1)   CEMA only: base phase logits; θ_{j,k} = sigmoid(theta_j)·2π/N·k
    """

    def __init__(self, dim: int, ema_dim: int, chunk: int, complex_ema: bool = False) -> None:
        super().__init__()
        self.dim, self.ema_dim, self.chunk, self.complex_ema = dim, ema_dim, chunk, complex_ema
        self.alpha = nn.Parameter(torch.empty(dim, ema_dim))
        self.delta = nn.Parameter(torch.empty(dim, ema_dim))
        self.omega = nn.Parameter(torch.empty(dim))
        if complex_ema:
            self.gamma = nn.Parameter(torch.empty(dim, ema_dim, 2))
            self.theta = nn.Parameter(torch.empty(dim, 1))
        else:
            self.gamma = nn.Parameter(torch.empty(dim, ema_dim))
            self.beta = nn.Parameter(torch.empty(dim, ema_dim))
        self.reset_parameters()
        self._memo: dict[str, tuple[tuple, Any]] = {}  # see `kept`

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation of Mega's EMA / Megalodon's CEMA (docs/design-notes.md, 'EMA parameter names and
        initialisation')."""
        nn.init.normal_(self.alpha, 0.0, 0.2)
        nn.init.normal_(self.delta, 0.0, 0.2)
        nn.init.trunc_normal_(self.omega, 0.0, 0.25, -1.0, 1.0)
        if self.complex_ema:
            nn.init.normal_(self.gamma[..., 0], 0.0, 1.0)
            self.gamma[..., 1].zero_()
            # log-spaced base frequencies: sigmoid(theta_j) = exp(-k ln D / D) for a random permutation of k
            k = torch.randperm(self.dim).float() + 1
            freq = torch.exp(-k * math.log(self.dim) / self.dim).clamp(1e-6, 1 - 1e-6)
            self.theta.copy_(torch.logit(freq)[:, None])
        else:
            nn.init.normal_(self.gamma, 0.0, 1.0)
            sign = torch.tensor([(-1.0) ** i for i in range(self.ema_dim)])
            self.beta.copy_(sign + 0.02 * torch.randn(self.dim, self.ema_dim))

    def coeffs(self) -> EmaCoeffs:
        a, d = torch.sigmoid(self.alpha.float()), torch.sigmoid(self.delta.float())
        log_q = torch.log1p(-a * d)  # log1p keeps slow decays from rounding to q = 1 (docs/architecture.md, 'The EMA')
        scale = self.ema_dim**-0.5
        if not self.complex_ema:
            return EmaCoeffs(p_DN=a * self.beta.float(), log_q_DN=log_q, gamma_DN=self.gamma.float() * scale)
        k = torch.arange(1, self.ema_dim + 1, device=a.device, dtype=torch.float32)
        theta_DN = torch.sigmoid(self.theta.float()) * (2 * math.pi / self.ema_dim) * k
        return EmaCoeffs(p_DN=a, log_q_DN=torch.complex(log_q, theta_DN),
                         gamma_DN=torch.view_as_complex(self.gamma.float().contiguous()) * scale)

    def kept(self, tag: str, extra: tuple, make: Callable[[], Any]) -> Any:
        """make(), kept between calls without autograd and outside torch.compile until a parameter changes or
        `extra` does. In eager inference the ~20 small ops that derive the step's coefficients from the parameters
        cost as much as the step's recurrence, and a prefill's chunk powers about a fifth of it. A change is seen
        through each parameter's storage and version counter (bumped by `optimizer.step()` of torch's default
        optimizers, `load_state_dict` and any in-place op) and by `train()`/`eval()`, which empty the memo; updates
        that bypass the counter (`param.data.copy_`, fused optimizer kernels) need `clear_kept()` before inference
        unless a mode switch follows them. Inference tensors (torch.inference_mode) have no counter: no memo."""
        params = list(self.parameters())
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or any(p.is_inference() for p in params):
            return make()
        key = (extra, *((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
        held = self._memo.get(tag)
        if held is None or held[0] != key:
            held = self._memo[tag] = (key, make())
        return held[1]

    def clear_kept(self) -> None:
        """Forget what `kept` holds (after changing parameters behind their version counter)."""
        self._memo.clear()

    def train(self, mode: bool = True) -> DampedEMA:
        self._memo.clear()  # a trainer's eval/train switches bracket every change of the weights
        return super().train(mode)

    def step_coeffs(self) -> tuple[EmaCoeffs, Tensor, Tensor]:
        """(coefficients, decay q (D, N), ω in fp32) for a decoding step (kept: see `kept`)."""

        def make() -> tuple[EmaCoeffs, Tensor, Tensor]:
            co = self.coeffs()
            return co, co.decay(), self.omega.float()

        return self.kept("step", (), make)

    def new_state(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        dtype = torch.complex64 if self.complex_ema else torch.float32
        return torch.zeros(batch_size, self.dim, self.ema_dim, dtype=dtype, device=device)

    def forward(self, x_BLD: Tensor, state_BDN: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """EMA over time. Returns (out (B, L, D) in x's dtype, final state (B, D, N))."""
        if x_BLD.shape[1] == 1 and state_BDN is not None:
            co, q_DN, omega_D = self.step_coeffs()
            y_BD, state = ema_step(x_BLD[:, 0], co, state_BDN, q_DN)
            return torch.addcmul(y_BD[:, None], omega_D, x_BLD.float()).to(x_BLD.dtype), state  # y + ω x
        c = min(self.chunk, x_BLD.shape[1])
        co, weights = self.kept("chunk", (c,), lambda: (co := self.coeffs(), chunk_weights(co, c, self.omega)))
        x_BDL = swap_time_channels(x_BLD.float())
        y_BDL, state = ema_chunked(x_BDL, co, self.chunk, state_BDN, weights=weights)  # ω ⊙ x included
        return swap_time_channels(y_BDL).to(x_BLD.dtype), state
