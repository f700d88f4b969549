"""Certified attribution training: ``cert-ibp`` and ``cert-crown-ibp`` (SPEC 9.4).

Both methods minimise, through the one training loop (:func:`certattr.train.fit`),

    L = kappa_t CE(f(x~), y) + (1 - kappa_t) CE(-m(x; eps_t), y) + lambda_t A(x; eps_t)

* x~ = x (``adv_steps`` 0) or the PGD maximiser of the CE at eps_t (``adv_steps`` > 0);
* m(x; eps) = a certified lower bound on the margins f_y(x') - f_j(x') over B_p(x, eps) ∩ [lo, hi]^n
  (m_y = 0), so CE(-m, y) is the robust (verified) cross-entropy of Gowal et al. 2018 ("On the
  effectiveness of interval bound propagation"), with the last layer elided into the margin
  specification.  ``cert-ibp`` uses interval bounds (IBP); ``cert-crown-ibp`` mixes
  m = beta_t m_CROWN-IBP + (1 - beta_t) m_IBP as Zhang et al. 2020 ("Towards stable and efficient
  training of verifiably robust neural networks"): IBP bounds on every intermediate layer, a CROWN
  backward pass (linear relaxations, adaptive lower slope) from the margin specification;
  beta_t goes from ``crown_start`` (1) to ``crown_end`` (0) over the ramp;
* A(x; eps) = a certified attribution loss from an interval box gL <= g(x') <= gU on the saliency
  g(x') = d f_y / d x' over the whole ball (the interval backward pass of SPEC 3.2, as Wicker et al.,
  ICLR 2023, "Robust explanation constraints for neural networks"):
    - ``attr_loss = "euclidean"``: r(x) / ||g(x)||_2 with r = ||max(gU - g(x), g(x) - gL)||_2, the
      certified Euclidean deviation normalised by the attribution's own size.  By the tangent bound
      (SPEC 3.1) cos(g(x), g(x')) >= sqrt(1 - r^2 / ||g||^2), so r / ||g|| <= 0.436 certifies
      cosine >= 0.9; the ratio is invariant to rescaling the logits;
    - ``attr_loss = "cosine"``: 1 - (certified lower bound on cos(g(x), g(x')) from the box,
      the max of the box and tangent bounds as in ``bounds.certified``).
  ``attribution = "grad_x_input"`` bounds g(x') * x' instead (interval product with the input box).

Everything is computed directly on the model's layers (not through ``bounds``, whose parsed chain
detaches the weights), so the loss is differentiable in the parameters: the gradient flows through
the mid-radius products W c, |W| r, the monotone activations and the interval min / max; the ReLU
derivative box {0}, {1} or [0, 1] is piecewise constant in the parameters (zero derivative, which is
the exact derivative almost everywhere), softplus' box [sigmoid(beta l), sigmoid(beta u)] is smooth.

Bounds (per layer, midpoint-radius form, Rump 1999): for h in [c - r, c + r], W h + b lies in
[W c + b - |W| r, W c + b + |W| r]; monotone activations map end points; under l2 the first affine
layer also uses the exact range W x + b +- eps ||W_j||_2.  The backward pass: v_K = e_y,
v <- W^T v (Linear), conv_transpose(v, W) (Conv2d), a'(z) * v (activation, interval product),
max-pool routing box times v (``bounds.gradgraph.maxpool_routing_box``, autograd's first-maximum rule).

Schedule (progress p in epochs from ``certattr.train.losses.current_progress``, which the loop sets):
``warmup_epochs`` of clean CE only (eps_t = lambda_t = 0, no bound computed), then over
``ramp_epochs`` eps_t = eps s(t), lambda_t = lambda s(t) with t the ramp fraction and s linear or
"smoothed" (auto_LiRPA's SmoothedScheduler shape: s = a t^4 up to t = 0.25, then linear, C^1,
s(1) = 1); kappa_t = 1 - (1 - kappa) t and beta_t linear in t.  Outside the loop (no progress) the
end values are used.

Stability tricks (measured, benchmarks/results/certtrain.md "Stability tricks"; both off by default):
* ``ibp_init`` (bool, default False): the IBP initialisation of Shi et al. 2021 (:func:`ibp_initialise`),
  applied at the first step of training (progress exactly 0, which a resumed run never replays);
* ``grad_clip`` (a hyperparameter of the training loop, every method): max global gradient norm.
On MNIST (MLP 256-256, 2 epochs, 2 seeds) neither moved the certified-cosine fractions by more than the
seed-to-seed spread; ibp_init tightened the median certified ratio at l∞ 0.05 by 10-15% but cost 0.2-0.4
points of clean accuracy and 1.5-2 points of certified label accuracy; a clip of 10 never binds (gradient
norms stay below it), clips of 1 and 0.1 were within noise.  With the warm-up and ramp, training was
stable without them.  Also measured: the attribution term is what certifies the larger radius (l∞ 0.05:
87-92% of the samples at cosine 0.9 with lambda 1, 50% with lambda 0); adversarial CE, the linear ramp and
the cosine loss were within noise of the defaults.

Supported layers: Linear, Conv2d (zeros padding, groups 1), ReLU, Softplus, Flatten, AvgPool2d
(no ceil_mode, count_include_pad, no divisor_override), MaxPool2d (no ceil_mode; CROWN-IBP bounds
the part of the net above the last max-pool and uses intervals below it), Identity, Dropout(p=0).
BatchNorm is refused: in training mode it uses batch statistics, so the bound would certify another
function than the checkpoint evaluates (the "BatchNorm in eval" pitfall of interval training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CertattrError
from .certified_bounds import (  # noqa: F401  (re-exported: the bounds of the loss)
    Box,
    Forward,
    Layer,
    crown_ibp_margin,
    forward_bounds,
    gradient_bounds,
    ibp_margin,
    mul,
    parse_layers,
    robust_ce,
)
from .losses import current_progress, register_loss


# ----------------------------------------------------------------------------------------------
# attribution loss
# ----------------------------------------------------------------------------------------------
def cosine_from_box(g: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Lower bound on cos(g, g') for g' in the box (as ``bounds.certified``): max of the box bound
    (min of <g, g'> over the box / (||g|| max ||g'||), or / min ||g'|| when negative) and the tangent
    bound sqrt(1 - r^2/||g||^2) (-1 when r >= ||g||)."""
    gf, lf, uf = g.flatten(1), lower.flatten(1), upper.flatten(1)
    norm_g = gf.norm(dim=1).clamp_min(1e-12)
    num = torch.minimum(gf * lf, gf * uf).sum(dim=1)
    max_norm = torch.maximum(lf.abs(), uf.abs()).norm(dim=1).clamp_min(1e-12)
    gap = torch.where((lf <= 0) & (uf >= 0), torch.zeros_like(lf), torch.minimum(lf.abs(), uf.abs()))
    min_norm = gap.norm(dim=1)
    pos = num / (norm_g * max_norm)
    neg = torch.where(min_norm > 0, num / (norm_g * min_norm.clamp_min(1e-12)), -torch.ones_like(num))
    box = torch.where(num >= 0, pos, neg).clamp(-1.0, 1.0)
    ratio = (radius / norm_g).clamp(max=1.0)
    tangent = torch.where(radius < norm_g, torch.sqrt((1 - ratio**2).clamp_min(1e-12)), -torch.ones_like(ratio))
    return torch.maximum(box, tangent)


@dataclass
class CertifiedTerms:
    """Per-sample pieces of the certified loss (all differentiable in the parameters)."""

    logits: torch.Tensor      # f(x)
    g: torch.Tensor           # attribution at x
    lower: torch.Tensor       # attribution box
    upper: torch.Tensor
    radius: torch.Tensor      # ||max(upper - g, g - lower)||_2
    ratio: torch.Tensor       # radius / ||g||
    cosine: torch.Tensor      # certified cosine lower bound
    margin_ibp: torch.Tensor  # (B, K)
    fwd: Forward


def certified_terms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, norm: str = "inf",
                    attribution: str = "saliency", domain: tuple[float, float] = (0.0, 1.0),
                    layers: list[Layer] | None = None) -> CertifiedTerms:
    """Attribution box, certified Euclidean / cosine bounds and IBP margins of ``model`` at (x, y)
    over B_p(x, eps) ∩ domain, differentiable in the parameters.  The attribution explains logit y."""
    if eps < 0:
        raise CertattrError(f"eps must be >= 0, got {eps}")
    layers = layers if layers is not None else parse_layers(model, tuple(x.shape[1:]))
    fwd = forward_bounds(layers, x, eps, norm, domain)
    g, (lo, hi) = gradient_bounds(layers, fwd, y)
    if attribution == "grad_x_input":
        xbox = fwd.boxes[0]
        lo, hi = mul((lo, hi), xbox)
        g = g * x
        lo, hi = torch.minimum(lo, g), torch.maximum(hi, g)
    elif attribution != "saliency":
        raise CertattrError(f"certified training supports attribution saliency or grad_x_input, got {attribution!r}")
    radius = torch.maximum(hi - g, g - lo).flatten(1).norm(dim=1)
    norm_g = g.flatten(1).norm(dim=1)
    ratio = radius / norm_g.clamp_min(1e-12)
    cosine = cosine_from_box(g, lo, hi, radius)
    return CertifiedTerms(fwd.values[-1], g, lo, hi, radius, ratio, cosine, ibp_margin(layers, fwd, y), fwd)


# ----------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------
def smoothed_shape(t: float, midpoint: float = 0.25, power: float = 4.0) -> float:
    """auto_LiRPA SmoothedScheduler shape on [0, 1]: a t^p for t <= midpoint, then the tangent line;
    C^1 at the midpoint and s(1) = 1:  a = 1 / (m^p + p m^(p-1) (1 - m))."""
    t = min(max(t, 0.0), 1.0)
    a = 1.0 / (midpoint**power + power * midpoint ** (power - 1) * (1 - midpoint))
    if t <= midpoint:
        return a * t**power
    return a * midpoint**power + power * a * midpoint ** (power - 1) * (t - midpoint)


@dataclass
class Schedule:
    """Values at training progress p (epochs): eps_t, lambda_t, kappa_t, beta_t and the ramp fraction."""

    eps: float
    lam: float
    kappa: float
    beta: float
    fraction: float
    warmup: bool


def schedule_at(hp: dict, progress: float | None) -> Schedule:
    """eps / lambda / kappa / CROWN-beta at ``progress`` (None: the end values)."""
    if progress is None:
        t = 1.0
    elif progress < hp["warmup_epochs"]:
        return Schedule(0.0, 0.0, 1.0, float(hp.get("crown_start", 0.0)), 0.0, True)
    elif hp["ramp_epochs"] == 0:
        t = 1.0
    else:
        t = min(1.0, (progress - hp["warmup_epochs"]) / hp["ramp_epochs"])
    s = smoothed_shape(t) if hp["schedule"] == "smoothed" else t
    beta = hp.get("crown_start", 0.0) + (hp.get("crown_end", 0.0) - hp.get("crown_start", 0.0)) * t
    return Schedule(hp["eps"] * s, hp["lambda"] * s, 1.0 - (1.0 - hp["kappa"]) * t, beta, t, False)


# ----------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def ibp_initialise(layers: list[Layer], generator: torch.Generator | None = None) -> None:
    """IBP initialisation of Shi et al. 2021 ("Fast certified robust training with short warm-up",
    NeurIPS; their ``manual_init.ibp_init``): every Linear / Conv2d weight except the last affine layer's
    is redrawn from N(0, sigma^2) with sigma = sqrt(2 pi) / fan_in, so that the interval radius keeps its
    size from layer to layer at initialisation (E ||W||_1-row = fan_in sigma sqrt(2 / pi) = 2, halved by the
    ReLU); biases and the last layer are left as they are.  In place, from ``generator`` (CPU)."""
    affine = [layer.module for layer in layers if isinstance(layer.module, (nn.Linear, nn.Conv2d))]
    for module in affine[:-1]:
        weight = module.weight
        fan_in = weight[0].numel()
        draw = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        weight.copy_((draw * (2 * torch.pi) ** 0.5 / fan_in).to(weight.dtype))


def _ibp_init_generator() -> torch.Generator:
    """A generator seeded from the loop's epoch seed (torch.initial_seed(), set by the loop before the
    first step), so the initialisation is reproducible and does not consume the loss' own random stream."""
    return torch.Generator().manual_seed((torch.initial_seed() * 2654435761 + 97) % (2**63))


def certified_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict, *, crown: bool,
                   progress: float | None) -> torch.Tensor:
    """kappa_t CE(f(x~), y) + (1 - kappa_t) CE(-m, y) + lambda_t A(x; eps_t) (see the module doc).

    With ``ibp_init``, the first step of training (progress exactly 0: epoch 0, step 0, which a resumed
    run never replays) first re-initialises the weights (:func:`ibp_initialise`) before computing the loss."""
    layers = parse_layers(model, tuple(x.shape[1:]))
    if hp.get("ibp_init") and progress == 0.0:
        ibp_initialise(layers, _ibp_init_generator())
    sch = schedule_at(hp, progress)
    domain = tuple(hp.get("domain", [0.0, 1.0]))
    if sch.warmup or sch.eps <= 0:
        h = x
        for layer in layers:
            h = layer.module(h)
        return F.cross_entropy(h, y)
    terms = certified_terms(model, x, y, eps=sch.eps, norm=hp["norm"], attribution=hp["attribution"],
                            domain=domain, layers=layers)
    if hp["adv_steps"] > 0:
        from .adversarial import pgd_ce

        attack = {"eps": sch.eps, "norm": hp["norm"], "steps": hp["adv_steps"],
                  "step_size": 2.5 * sch.eps / hp["adv_steps"], "random_start": True, "domain": list(domain)}
        ce = F.cross_entropy(model(pgd_ce(model, x, y, attack)), y)
    else:
        ce = F.cross_entropy(terms.logits, y)
    margin = terms.margin_ibp
    if crown and sch.beta > 0:
        m_crown = crown_ibp_margin(layers, terms.fwd, y, x, sch.eps, hp["norm"])
        margin = sch.beta * m_crown + (1 - sch.beta) * margin
    loss = sch.kappa * ce
    if sch.kappa < 1:
        loss = loss + (1 - sch.kappa) * robust_ce(margin, y)
    if sch.lam > 0:
        attr = terms.ratio if hp["attr_loss"] == "euclidean" else 1 - terms.cosine
        loss = loss + sch.lam * attr.mean()
    return loss


# ----------------------------------------------------------------------------------------------
# hyperparameters
# ----------------------------------------------------------------------------------------------
# Defaults: the recipe measured on MNIST (benchmarks/bench_certtrain.py: MLP, 3 epochs; ramp finished
# after 1.7 epochs); for longer runs (GPU) a longer ramp is the usual choice (auto_LiRPA: 10-20% warm-up,
# ramp over about half of the epochs).
_COMMON = {"eps": 0.05, "norm": "inf", "lambda": 1.0, "kappa": 0.5, "warmup_epochs": 0.2, "ramp_epochs": 1.5,
           "schedule": "smoothed", "attr_loss": "euclidean", "attribution": "saliency", "adv_steps": 0,
           "domain": [0.0, 1.0], "ibp_init": False}
DEFAULTS_IBP = {"*": dict(_COMMON)}
DEFAULTS_CROWN_IBP = {"*": {**_COMMON, "crown_start": 1.0, "crown_end": 0.0}}


def check_certified_hparams(method: str, hp: dict) -> dict:
    """Method-specific checks on an already type-normalised ``hp``: eps > 0, kappa / crown weights in
    [0, 1], epochs >= 0, schedule / attr_loss / attribution from their lists."""
    if "eps" in hp and hp["eps"] <= 0:
        raise CertattrError(f"{method}: eps must be > 0 (the certified radius trained for), got {hp['eps']:g}")
    for key in ("kappa", "crown_start", "crown_end"):
        if key in hp and not 0.0 <= hp[key] <= 1.0:
            raise CertattrError(f"{method}: hyperparameter {key} must be in [0, 1], got {hp[key]:g}")
    if "schedule" in hp and hp["schedule"] not in ("linear", "smoothed"):
        raise CertattrError(f"{method}: schedule must be linear or smoothed, got {hp['schedule']!r}")
    if "attr_loss" in hp and hp["attr_loss"] not in ("euclidean", "cosine"):
        raise CertattrError(f"{method}: attr_loss must be euclidean or cosine, got {hp['attr_loss']!r}")
    if "attribution" in hp and hp["attribution"] not in ("saliency", "grad_x_input"):
        raise CertattrError(f"{method}: attribution must be saliency or grad_x_input, got {hp['attribution']!r}")
    return hp


@register_loss("cert-ibp", DEFAULTS_IBP, weight="lambda", check=check_certified_hparams)
def cert_ibp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """Certified attribution training with interval bounds (Gowal et al. 2018; Wicker et al. 2023):
    kappa_t CE(f(x~), y) + (1 - kappa_t) CE(-m_IBP(x; eps_t), y) + lambda_t A(x; eps_t)."""
    return certified_loss(model, x, y, hp, crown=False, progress=current_progress())


@register_loss("cert-crown-ibp", DEFAULTS_CROWN_IBP, weight="lambda", check=check_certified_hparams)
def cert_crown_ibp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict) -> torch.Tensor:
    """As cert-ibp with the margin bound beta_t m_CROWN-IBP + (1 - beta_t) m_IBP (Zhang et al. 2020),
    beta_t from crown_start to crown_end over the ramp."""
    return certified_loss(model, x, y, hp, crown=True, progress=current_progress())
