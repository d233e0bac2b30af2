"""One definition per op: schema, input checks, fake implementation and autograd (docs/design.md).

A kernel backend registers the ops of :data:`SCHEMAS` in its own ``torch.library`` namespace
with :func:`define_ops`: ``relayops`` for the compiled CPU/CUDA kernels, ``relayops_triton`` for
Triton. It supplies forward functions only, taking the schema's arguments. Everything else is
written once here and shared by every backend:

* the checks (``relayops._validate``), run by the real and the fake implementation alike, so a
  direct ``torch.ops.relayops.*`` call with bad input raises the public ops' error;
* the fake implementation (torch.compile): the output is ``torch.empty_like`` of the first
  argument, which is also the layout every backend returns;
* the fallback to the reference for patch sizes above the kernels' limit;
* the autograd formulas, in terms of the namespace's own ops (adjoints and parameter
  gradients of docs/spec.md section 13), so every backend gives the same gradients.

The reference backend has the same signatures (``relayops.reference``) and differentiates
through PyTorch; the public ops in this package validate, convert and dispatch to one of them.
"""
from __future__ import annotations

import re
from collections import namedtuple
from types import SimpleNamespace
from typing import Callable

import torch

from .. import reference
from .._validate import (FLOAT_DTYPES, acc_dtype, check_image, check_per_sample_tensor, check_real, check_same,
                         check_seeds_tensor, require)

# Per-sample parameters are [B] tensors; seed and offset are 64-bit values as int64 (two's
# complement); seeds is None (one stream for the batch) or per-sample int64 seeds (SPEC 4).
SCHEMAS = {
    "patch_dct": "(Tensor x, int s) -> Tensor",
    "patch_idct": "(Tensor u, int s) -> Tensor",
    "patch_blur": "(Tensor x, Tensor tau, int s, float d_min) -> Tensor",
    "block_noise": "(Tensor g, int s, bool adjoint) -> Tensor",
    "relay_noise": "(Tensor like, int s, float alpha, float k, int seed, int offset, Tensor? seeds, Tensor? eps, "
                   "Tensor? eps2) -> Tensor",
    "relay_corrupt": "(Tensor y, Tensor sigma, Tensor tau, int s, float d_min, float alpha, float k, int seed, "
                     "int offset, Tensor? seeds, Tensor? eps, Tensor? eps2) -> Tensor",
    "relay_step": "(Tensor x, Tensor x0_hat, Tensor sigma, Tensor sigma_next, Tensor tau, Tensor tau_next, "
                  "float eta, int s, float d_min, float alpha, float k, int seed, int offset, Tensor? seeds, "
                  "Tensor? eps, Tensor? eps2, Tensor? x_prop, Tensor? x0_hat_prop, Tensor? x0_hat_b, "
                  "Tensor? correction) -> Tensor",
}
OPS = tuple(SCHEMAS)
# Each op's arguments by name: ARGS["patch_blur"](x, tau, s, d_min).x
ARGS = {name: namedtuple(name, re.findall(r"(\w+)(?=[,)])", schema.split("->")[0])) for name, schema in SCHEMAS.items()}

PER_SAMPLE = ("sigma", "sigma_next", "tau", "tau_next")  # [B] parameters; relay_step takes all four
STEP_NOT_DIFFERENTIABLE = ("relay_step is not differentiable with respect to sigma, sigma_next, tau or tau_next; "
                           "pass them without requires_grad (detach them)")
CORRECTION_NOT_DIFFERENTIABLE = ("relay_step is not differentiable with respect to correction (a sampler's "
                                 "host-computed factor); pass it without requires_grad (detach it)")

_COMPANIONS = ("x0_hat", "x_prop", "x0_hat_prop", "x0_hat_b", "eps", "eps2")  # tensors shaped like the image


# Per op: the position of each argument, of the image-shaped companions, of the [B] parameters
# and of the parameters the kernels take in the accumulation dtype (computed once, not per call).
_FIELDS = {name: args._fields for name, args in ARGS.items()}
_AT = {name: {f: i for i, f in enumerate(fields)} for name, fields in _FIELDS.items()}
_COMPANION_AT = {name: tuple((i, f, "the image" if f.startswith("eps") else fields[0])
                             for i, f in enumerate(fields) if f in _COMPANIONS)
                 for name, fields in _FIELDS.items()}
_PER_SAMPLE_AT = {name: tuple((i, f) for i, f in enumerate(fields) if f in PER_SAMPLE)
                  for name, fields in _FIELDS.items()}
_ACC_AT = {name: tuple(i for i, f in enumerate(fields) if f in PER_SAMPLE or f == "correction")
           for name, fields in _FIELDS.items()}
_TENSOR_AT = {name: tuple(i for i, t in enumerate(re.findall(r"(\w+\??) \w+(?=[,)])", schema.split("->")[0]))
                          if t.startswith("Tensor"))
              for name, schema in SCHEMAS.items()}


def check_args(name: str, args, dtypes=FLOAT_DTYPES, backend: str | None = None) -> None:
    """Check the arguments of op ``name`` (as the schema orders them)."""
    at = _AT[name]
    image, s = args[0], args[at["s"]]
    if not s >= 1:
        raise ValueError(f"s (patch size) must be an int >= 1, got {s}")
    check_image(_FIELDS[name][0], image, s)
    check_supported(backend, dtypes, image)
    for i, field, like in _COMPANION_AT[name]:
        if args[i] is not None:
            check_same(field, args[i], like, image)
    for i, field in _PER_SAMPLE_AT[name]:
        check_per_sample_tensor(field, args[i], image)
    if "seeds" in at:
        seeds, eps, eps2, alpha = args[at["seeds"]], args[at["eps"]], args[at["eps2"]], args[at["alpha"]]
        if seeds is not None:
            check_seeds_tensor(seeds, image)
        check_real("alpha", alpha, low=0.0)
        if eps is None and eps2 is not None:
            raise ValueError("eps2 was given without eps: pass both noise tensors, or neither")
        if eps is not None and eps2 is None and alpha != 0.0:
            raise ValueError("eps was given without eps2: pass both (eps2 may be left out only when alpha = 0)")
    if "d_min" in at:
        check_real("d_min", args[at["d_min"]], low=0.0, high=1.0)
    if "eta" in at:
        check_real("eta", args[at["eta"]], low=0.0, high=1.0, high_open=True)
        x_prop, x0_hat_prop = args[at["x_prop"]], args[at["x0_hat_prop"]]
        x0_hat_b, correction = args[at["x0_hat_b"]], args[at["correction"]]
        if (x_prop is None) != (x0_hat_prop is None):
            raise ValueError("x_prop and x0_hat_prop go together: pass both for the Heun step, or neither")
        if (x0_hat_b is None) != (correction is None):
            raise ValueError("x0_hat_b and correction go together: pass both for the second-order step, or neither")
        if x0_hat_b is not None and x_prop is not None:
            raise ValueError("the Heun step (x_prop, x0_hat_prop) and the second-order step (x0_hat_b, correction) "
                             "exclude each other")
        if correction is not None:
            check_correction(correction, image, s)


def check_correction(t, image: torch.Tensor, s: int) -> torch.Tensor:
    """relay_step's correction factor: a floating ``[B, s, s]`` tensor on the image's device."""
    require(isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES, TypeError, lambda: (
        f"correction must be a floating tensor of shape [s, s] or [B, s, s], got {type(t).__name__}"
        + (f" of dtype {t.dtype}" if isinstance(t, torch.Tensor) else "")))
    b = image.shape[0]
    require(t.dim() == 3 and t.shape[0] == b and t.shape[1] == s and t.shape[2] == s, ValueError, lambda: (
        f"correction must have shape [B, s, s] = [{b}, {s}, {s}], got {tuple(t.shape)}"))
    require(t.device == image.device, ValueError, lambda: (
        f"correction is on {t.device}; it must be on the image's device {image.device}"))
    return t


def check_supported(backend: str | None, dtypes, image: torch.Tensor) -> None:
    """The backend's storage dtypes (Triton has no float64)."""
    if image.dtype not in dtypes:
        raise TypeError(f"the {backend!r} backend supports {', '.join(str(d).replace('torch.', '') for d in dtypes)} "
                        f"tensors, got {image.dtype}; use backend='reference' (or 'cpu'/'cuda' where built) for it")


def _kernel_args(name: str, args: tuple) -> tuple:
    """The arguments as kernels take them: per-sample parameters (and correction) contiguous in
    the accumulation dtype of the image, per-sample seeds contiguous. The public ops already pass
    them so (no tensor op then)."""
    acc = acc_dtype(args[0].dtype)
    out = None  # a copy of args only when something converts
    for i in _ACC_AT[name]:
        v = args[i]
        if v is not None and (v.dtype != acc or not v.is_contiguous()):
            out = out or list(args)
            out[i] = v.to(acc).contiguous()
    i = _AT[name].get("seeds")
    if i is not None and args[i] is not None and not args[i].is_contiguous():
        out = out or list(args)
        out[i] = args[i].contiguous()
    return args if out is None else tuple(out)


def _in_fake_layout(result: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``result`` in the layout of ``torch.empty_like(like)``, the fake implementation's output
    and so every backend's (channels_last in, channels_last out)."""
    if like.is_contiguous() and result.is_contiguous():
        return result
    promised = torch.empty_like(like, device="meta").stride()  # no memory: only the strides
    return result if result.stride() == promised else torch.empty_like(like).copy_(result)


def reference_table() -> dict[str, Callable]:
    """The reference backend's forward functions: ``relayops.reference`` behind the same checks
    and with the same output layout as the kernel backends (autograd runs through both)."""
    def wrap(name, fn):
        def forward(*args):
            check_args(name, args)
            return _in_fake_layout(fn(*args), args[0])
        return forward
    return {name: wrap(name, getattr(reference, name)) for name in OPS}


# The torch.library registrations live as long as these objects.
_LIBRARIES: list = []
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def _needs_dispatcher(args, tensor_at) -> bool:
    """Whether a call must go through torch's dispatcher: while torch.compile traces, under a
    dispatch or function mode (fake tensors, opcheck, functorch transforms), with a tensor
    subclass, or when autograd records the call. Otherwise the public ops call the checked
    forward function directly, which is what the dispatcher would reach (about 10-20 us less
    per call on a CPU, most of it converting every argument to and from the boxed form twice).
    ``tensor_at``: the positions of the schema's tensor arguments, the only ones looked at."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()):
        return True
    grad = torch.is_grad_enabled()
    for i in tensor_at:
        v = args[i]
        if isinstance(v, torch.Tensor) and (type(v) is not torch.Tensor or (grad and v.requires_grad)):
            return True
    return False


class Op:
    """A registered op as the public ops call it: ``op(*args)`` (the schema's arguments) runs the
    checked forward function directly when the dispatcher adds nothing (:func:`_needs_dispatcher`),
    else ``torch.ops.<namespace>.<name>`` (autograd, torch.compile, modes). Either way the
    arguments are checked once, by the forward function (or by the fake one while tracing)."""

    __slots__ = ("name", "forward", "packet", "tensor_at")

    def __init__(self, name: str, forward: Callable, packet):
        self.name, self.forward, self.packet = name, forward, packet
        self.tensor_at = _TENSOR_AT[name]

    def __call__(self, *args):
        if _needs_dispatcher(args, self.tensor_at):
            return self.packet(*args)
        return self.forward(*args)


def define_ops(namespace: str, kernels: dict[str, Callable], *, backend: str, device_types, max_s: int,
               dtypes=FLOAT_DTYPES):
    """Register every op of :data:`SCHEMAS` as ``namespace::name`` with the forward function
    ``kernels[name]`` and the shared checks, fake and autograd. A kernel gets checked arguments
    (per-sample parameters and seeds contiguous, parameters in the accumulation dtype) and
    returns a new tensor like the first argument. Patch sizes above ``max_s`` run the reference
    instead. Returns a namespace whose attribute ``name`` is the :class:`Op` the public ops call.

    The registration is the plain one (``Library.define``, ``impl`` for each device type,
    ``register_fake``, ``register_autograd``): a call through the dispatcher costs less than
    with ``torch.library.custom_op``, whose extra wrappers convert the arguments once more."""
    lib = torch.library.Library(namespace, "FRAGMENT")
    _LIBRARIES.append(lib)
    packets = getattr(torch.ops, namespace)
    table = {}
    for name, schema in SCHEMAS.items():
        def forward(*args, _name=name, _kernel=kernels[name], _fallback=getattr(reference, name),
                    _s=_AT[name]["s"]):
            check_args(_name, args, dtypes, backend)
            if args[_s] > max_s:
                return _in_fake_layout(_fallback(*args), args[0])
            return _in_fake_layout(_kernel(*_kernel_args(_name, args)), args[0])

        def fake(*args, _name=name):
            check_args(_name, args, dtypes, backend)
            return torch.empty_like(args[0])

        qualname = f"{namespace}::{name}"
        lib.define(name + schema)
        for device_type in device_types:
            lib.impl(name, forward, _DISPATCH_KEYS[device_type])
        torch.library.register_fake(qualname, fake, lib=lib)
        torch.library.register_autograd(qualname, lambda ctx, grad, _backward=_BACKWARD[name]:
                                        _backward(packets, ctx, grad), setup_context=_setup_context(name), lib=lib)
        table[name] = Op(name, forward, getattr(packets, name))
    return SimpleNamespace(**table)


# ----------------------------------------------------------------------------------------------
# Autograd. setup_context keeps the tensors a formula reads (SAVED) and every non-tensor
# argument; backward gets them back by name and returns one gradient (or None) per argument.

def _saved_blur(wants):
    return {"tau"} | ({"x"} if wants("tau") else set())


def _saved_corrupt(wants):
    return {"sigma", "tau"} | ({"y"} if wants("tau") else set()) | (
        {"seeds", "eps", "eps2"} if wants("sigma") else set())


SAVED = {"patch_blur": _saved_blur, "relay_corrupt": _saved_corrupt,
         "relay_step": lambda wants: set(PER_SAMPLE) | {"correction"}}


class _Saved:
    """The arguments of one op call as attributes; tensors the formula does not read are None.
    ``given(name)``: the argument was a tensor (not None); ``wants(name)``: it needs a gradient."""

    def __init__(self, ctx, values: dict):
        self.__dict__.update(values)
        self._ctx = ctx

    def given(self, name: str) -> bool:
        return name in self._ctx.given

    def wants(self, name: str) -> bool:
        return self._ctx.needs_input_grad[self._ctx.fields.index(name)]


def _setup_context(name: str):
    fields = ARGS[name]._fields

    def setup(ctx, inputs, output):
        ctx.fields = fields
        wants = lambda f: ctx.needs_input_grad[fields.index(f)]  # noqa: E731
        keep = SAVED.get(name, lambda w: set())(wants)
        tensor_fields = [f for f, v in zip(fields, inputs) if isinstance(v, torch.Tensor)]
        ctx.given = set(tensor_fields)
        ctx.tensor_fields = [f for f in tensor_fields if f in keep]
        ctx.save_for_backward(*(v for f, v in zip(fields, inputs) if f in ctx.tensor_fields))
        ctx.scalars = {f: v for f, v in zip(fields, inputs) if not isinstance(v, torch.Tensor) and v is not None}

    return setup


def _load(ctx) -> _Saved:
    values = dict.fromkeys(ctx.fields)
    values.update(ctx.scalars)
    values.update(zip(ctx.tensor_fields, ctx.saved_tensors))
    return _Saved(ctx, values)


def _grads(ctx, **grads) -> tuple:
    """One entry per argument, in schema order: the given gradients, None elsewhere."""
    return tuple(grads.get(f) for f in ctx.fields)


def _col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _tau_grad(ops, g: torch.Tensor, x: torch.Tensor, tau: torch.Tensor, s: int, d_min: float) -> torch.Tensor:
    """d<g, patch_blur(x, tau)>/d tau_b = sum over sample b of patch_dct(g) D'(tau_b) patch_dct(x)
    (the blur is diagonal in each patch's DCT basis; docs/spec.md section 13)."""
    acc = acc_dtype(x.dtype)
    b, c, h, w = x.shape
    product = ops.patch_dct(g, s).to(acc) * ops.patch_dct(x, s).to(acc)
    per_frequency = product.reshape(b, c, h // s, s, w // s, s).sum(dim=(1, 2, 4))  # [B, s, s]
    d_response = reference.blur_response_grad(tau.to(acc), s, d_min)
    return (per_frequency * d_response).sum(dim=(1, 2)).to(tau.dtype)


def _noise_grads(ops, a: _Saved, g: torch.Tensor, scale):
    """Gradients w.r.t. eps and eps2 of ``scale * k (eps + alpha block_noise(eps2))`` (scale: a
    float or a [B, 1, 1, 1] tensor), in g's dtype; None for noise drawn in the kernel."""
    if not a.given("eps"):
        return None, None
    g_eps = g.to(acc_dtype(g.dtype)) * (a.k * scale)
    g_eps2 = a.alpha * ops.block_noise(g_eps, a.s, True) if a.given("eps2") else None
    return g_eps.to(g.dtype), None if g_eps2 is None else g_eps2.to(g.dtype)


def _dct_backward(ops, ctx, g):
    return _grads(ctx, x=ops.patch_idct(g, _load(ctx).s))


def _idct_backward(ops, ctx, g):
    return _grads(ctx, u=ops.patch_dct(g, _load(ctx).s))


def _block_backward(ops, ctx, g):
    a = _load(ctx)
    return _grads(ctx, g=ops.block_noise(g, a.s, not a.adjoint))


def _blur_backward(ops, ctx, g):
    a = _load(ctx)
    g_x = ops.patch_blur(g, a.tau, a.s, a.d_min) if a.wants("x") else None  # self-adjoint per patch
    g_tau = _tau_grad(ops, g, a.x, a.tau, a.s, a.d_min) if a.wants("tau") else None
    return _grads(ctx, x=g_x, tau=g_tau)


def _noise_backward(ops, ctx, g):
    a = _load(ctx)
    g_eps, g_eps2 = _noise_grads(ops, a, g, 1.0)
    return _grads(ctx, eps=g_eps, eps2=g_eps2)


def _corrupt_backward(ops, ctx, g):
    """y -> patch_blur(y, tau) + sigma n: linear in y, eps, eps2; sigma's gradient is <g, n>."""
    a = _load(ctx)
    acc = acc_dtype(g.dtype)
    grads = {}
    if a.wants("y"):
        grads["y"] = ops.patch_blur(g, a.tau, a.s, a.d_min)
    if a.wants("tau"):
        grads["tau"] = _tau_grad(ops, g, a.y, a.tau, a.s, a.d_min)
    if a.wants("sigma"):
        n = ops.relay_noise(g, a.s, a.alpha, a.k, a.seed, a.offset, a.seeds, a.eps, a.eps2)  # the same noise again
        grads["sigma"] = (g.to(acc) * n.to(acc)).sum(dim=(1, 2, 3)).to(a.sigma.dtype)
    grads["eps"], grads["eps2"] = _noise_grads(ops, a, g, _col(a.sigma.to(acc)))
    return _grads(ctx, **grads)


def _step_backward(ops, ctx, g):
    """out = gamma x + patch_idct((D' - gamma D) patch_dct(x0_eff)) + eta sigma' n, linear in the
    images and noise tensors; x0_eff = (x + x0_hat)/2 - (sigma/sigma')(x' - x0_hat')/2 for Heun.
    Second order: plus patch_idct(E patch_dct(x0_hat_b - x0_hat)), E = correction."""
    a = _load(ctx)
    if any(a.wants(p) for p in PER_SAMPLE):
        raise NotImplementedError(STEP_NOT_DIFFERENTIABLE)
    if a.wants("correction"):
        raise NotImplementedError(CORRECTION_NOT_DIFFERENTIABLE)
    acc = acc_dtype(g.dtype)
    sigma, sigma_next = a.sigma.to(acc), a.sigma_next.to(acc)
    gamma = (1.0 - a.eta * a.eta) ** 0.5 * sigma_next / sigma
    # adjoint of x0_eff -> patch_idct((D' - gamma D) patch_dct(x0_eff)): the same map (symmetric)
    m = (ops.patch_blur(g, a.tau_next, a.s, a.d_min).to(acc)
         - _col(gamma) * ops.patch_blur(g, a.tau, a.s, a.d_min).to(acc))
    grads = {"x": _col(gamma) * g.to(acc), "x0_hat": m}
    if a.given("x_prop"):
        half, ratio = m / 2, _col(sigma / sigma_next)
        grads.update(x=grads["x"] + half, x0_hat=half, x_prop=-ratio * half, x0_hat_prop=ratio * half)
    if a.given("x0_hat_b"):  # adjoint of patch_idct(E patch_dct(.)): the same map (13.3)
        m_b = ops.patch_idct(reference.scale_coefficients(ops.patch_dct(g, a.s).to(acc), a.correction.to(acc), a.s),
                             a.s)
        grads.update(x0_hat=m - m_b, x0_hat_b=m_b)
    if a.eta != 0.0:
        grads["eps"], grads["eps2"] = _noise_grads(ops, a, g, a.eta * _col(sigma_next))
    cast = {f: v.to(g.dtype) if f in ("x", "x0_hat", "x_prop", "x0_hat_prop", "x0_hat_b") else v
            for f, v in grads.items()}
    return _grads(ctx, **cast)


_BACKWARD = {"patch_dct": _dct_backward, "patch_idct": _idct_backward, "patch_blur": _blur_backward,
             "block_noise": _block_backward, "relay_noise": _noise_backward, "relay_corrupt": _corrupt_backward,
             "relay_step": _step_backward}
