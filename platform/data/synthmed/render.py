"""SynthMed's world: sampling a scene (modality, organ, findings) and rendering it to a grayscale PNG.

Pure numpy, deterministic: the same scene gives the same bytes. Coordinates are fractions of the
image side (x to the right, y downwards, (0.5, 0.5) = the centre), so a scene renders at any size.

Positions are four non-overlapping wedges around the body centre: "left" / "right" (image left / right, not
the patient's), "upper" / "lower". Anatomy is drawn from a per-organ layout and a per-modality palette
(CT: black air, bright bone; MRI: bright fat rim, dark bone, blurred, uneven field; X-ray: a projection with
dark lungs, bright ribs and spine, findings adding to what lies under them). See docs/DATA.md, "SynthMed".
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODALITIES = ("ct", "mri", "xray")
ORGANS = ("chest", "brain", "abdomen")
KINDS = ("nodule", "mass", "effusion", "cyst")
POSITIONS = ("left", "right", "upper", "lower")
USUAL_SIDE = {"nodule": "left", "mass": "right", "cyst": "upper", "effusion": "lower"}  # the train world's prior
MODALITY_NAME = {"ct": "ct", "mri": "mri", "xray": "x-ray"}  # as written in questions and answers
# Plausible pairs only (no chest MRI, no skull X-ray).
MODALITY_ORGANS = {
    "ct": ("chest", "brain", "abdomen"),
    "mri": ("brain", "abdomen"),
    "xray": ("chest", "abdomen"),
}

_AXIS_ANGLE = {"left": np.pi, "right": 0.0, "upper": -np.pi / 2, "lower": np.pi / 2}  # y points down
SIZE_RANGE = {"nodule": (0.03, 0.045), "mass": (0.075, 0.1), "cyst": (0.05, 0.07), "effusion": (0.04, 0.06)}
# Outer body radii (x, y) per organ; X-ray is a projection, so the body fills (and leaves) the frame.
_BODY = {"chest": (0.44, 0.35), "brain": (0.36, 0.44), "abdomen": (0.44, 0.37)}
_XRAY_BODY = (0.47, 0.62)
_XRAY_FIELD = 0.38  # radius of the region findings lie in on an X-ray
_SUPERSAMPLE = 2  # render at 2x and average: smooth edges at 64x64

Grid = tuple[np.ndarray, np.ndarray]  # x and y of each pixel centre, fractions of the side, (S, S) each
Layers = Iterator[tuple[np.ndarray, str]]  # (mask, tissue) pairs painted in order


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    position: str  # one of POSITIONS
    size: float  # radius (effusion: half the thickness), fraction of the image side
    x: float  # centre, fraction of the width
    y: float  # centre, fraction of the height


@dataclass(frozen=True)
class Style:
    """Per-image variation: body placement and shape, intensity curve, noise, and a seed for textures."""

    cx: float
    cy: float
    scale: float  # body size factor
    gain: float
    offset: float
    gamma: float
    noise: float  # factor on the modality's noise level
    texture_seed: int


@dataclass(frozen=True)
class Scene:
    modality: str
    organ: str
    findings: tuple[Finding, ...]
    style: Style

    def kinds(self) -> list[str]:
        """Kinds of the findings, each once, in KINDS order."""
        return [k for k in KINDS if any(f.kind == k for f in self.findings)]

    def count(self, kind: str) -> int:
        return sum(f.kind == kind for f in self.findings)


# --- sampling ------------------------------------------------------------------------------------


def sample_scene(
    rng: np.random.Generator,
    *,
    max_findings: int = 3,
    normal_fraction: float = 0.25,
    usual_side: float = 0.0,
    companion: float = 0.0,
) -> Scene:
    """A random scene: modality uniform, organ uniform among its pairs, none or 1..max_findings findings.

    ``usual_side`` / ``companion`` skew the world (the train split's scene prior): a finding takes its kind's
    USUAL_SIDE with that chance when the side is free, and a scan with a mass gets an effusion too. At 0 no extra
    random number is drawn, so scenes are exactly those of a world without the prior.
    """
    modality = MODALITIES[int(rng.integers(len(MODALITIES)))]
    organs = MODALITY_ORGANS[modality]
    organ = organs[int(rng.integers(len(organs)))]
    style = Style(
        cx=0.5 + rng.uniform(-0.02, 0.02),
        cy=0.5 + rng.uniform(-0.02, 0.02),
        scale=rng.uniform(0.95, 1.04),
        gain=rng.uniform(0.85, 1.1),
        offset=rng.uniform(-0.05, 0.05),
        gamma=rng.uniform(0.85, 1.2),
        noise=rng.uniform(0.8, 1.25),
        texture_seed=int(rng.integers(2**31)),
    )
    n = 0 if rng.random() < normal_fraction else int(rng.integers(1, max_findings + 1))
    kinds = [KINDS[i] for i in rng.integers(len(KINDS), size=n)]  # with replacement: "two nodules" happens
    if companion > 0 and "mass" in kinds and "effusion" not in kinds and n < max_findings and rng.random() < companion:
        kinds.append("effusion")
    positions = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))[: len(kinds)]]  # at most one per position
    if usual_side > 0:
        positions = _usual_sides(rng, kinds, positions, usual_side)
    findings = _place_findings(rng, kinds, positions, modality=modality, organ=organ, style=style)
    return Scene(modality=modality, organ=organ, findings=findings, style=style)


def _usual_sides(rng: np.random.Generator, kinds: list[str], positions: list[str], chance: float) -> list[str]:
    """Positions re-assigned so that each finding takes its kind's usual side with ``chance`` (when still free);
    the others keep the drawn positions, in order, skipping sides already taken."""
    wanted = [USUAL_SIDE[k] if rng.random() < chance else None for k in kinds]
    chosen: list[str | None] = []
    for side in wanted:
        chosen.append(side if side is not None and side not in chosen else None)
    spare = iter([p for p in dict.fromkeys((*positions, *POSITIONS)) if p not in chosen])
    return [side if side is not None else next(spare) for side in chosen]


def _place_findings(
    rng: np.random.Generator,
    kinds: list[str],
    positions: list[str],
    *,
    modality: str,
    organ: str,
    style: Style,
) -> tuple[Finding, ...]:
    """Centres inside each position's wedge, re-drawn until no two findings touch (then on the axes)."""
    fx, fy = _field_radii(modality, organ, style)
    for attempt in range(31):
        jitter = attempt < 30  # the last attempt puts each finding on its wedge's axis: never overlaps
        found = []
        for kind, pos in zip(kinds, positions, strict=True):
            size = rng.uniform(*SIZE_RANGE[kind])
            angle = _AXIS_ANGLE[pos] + (rng.uniform(-0.3, 0.3) if jitter else 0.0)
            rho = rng.uniform(0.42, 0.62) if jitter else 0.55  # fraction of the field radius
            if kind == "effusion":  # against the wall
                rho = 1.0 - size / min(fx, fy)
            x, y = style.cx + rho * fx * np.cos(angle), style.cy + rho * fy * np.sin(angle)
            found.append(Finding(kind=kind, position=pos, size=float(size), x=float(x), y=float(y)))
        if not jitter or not _overlapping(found):
            return tuple(found)
    raise AssertionError("unreachable")


def _overlapping(findings: list[Finding]) -> bool:
    extent = [0.14 if f.kind == "effusion" else 1.2 * f.size for f in findings]
    for i, a in enumerate(findings):
        for j in range(i):
            b = findings[j]
            if np.hypot(a.x - b.x, a.y - b.y) < extent[i] + extent[j] + 0.02:
                return True
    return False


def _field_radii(modality: str, organ: str, style: Style) -> tuple[float, float]:
    """Radii (x, y) of the ellipse findings lie in: inside the body wall (CT / MRI) or the central field."""
    if modality == "xray":
        return _XRAY_FIELD, _XRAY_FIELD
    rx, ry = _BODY[organ]
    return 0.84 * rx * style.scale, 0.84 * ry * style.scale


# --- rendering -----------------------------------------------------------------------------------

# Tissue intensities per modality (0 = black, 1 = white) and how each finding kind looks there.
_PALETTE = {
    "ct": dict(air=0.0, soft=0.4, bone=0.95, lung=0.07, heart=0.5, vessel=0.5, fat=0.25, grey=0.45,
               white=0.5, csf=0.18, muscle=0.5, liver=0.5, kidney=0.55, gas=0.02, spine=0.95),
    "mri": dict(air=0.0, soft=0.45, bone=0.08, lung=0.05, heart=0.3, vessel=0.1, fat=0.92, grey=0.4,
                white=0.62, csf=0.1, muscle=0.28, liver=0.55, kidney=0.42, gas=0.0, spine=0.62),
}  # fmt: skip
_FINDING_LOOK = {  # kind -> (core, rim); X-ray values are added to what lies under the finding
    "ct": {"nodule": (0.92, None), "mass": (0.72, None), "cyst": (0.12, 0.85), "effusion": (0.74, None)},
    "mri": {"nodule": (0.95, None), "mass": (0.8, None), "cyst": (0.05, 0.92), "effusion": (0.85, None)},
    "xray": {"nodule": (0.42, None), "mass": (0.3, None), "cyst": (-0.28, 0.3), "effusion": (0.38, None)},
}
_BLUR = {"ct": 0.5, "mri": 1.1, "xray": 0.8}  # Gaussian sigma in output pixels
_NOISE = {"ct": 0.035, "mri": 0.02, "xray": 0.03}


def render_scene(scene: Scene, *, size: int = 64) -> np.ndarray:
    """The scene as a (size, size) uint8 image; deterministic (textures and noise come from the style).

    Anatomy, findings and noise draw from separate streams, so removing a finding changes only its pixels.
    """
    rng, finding_rng, noise_rng = np.random.default_rng(scene.style.texture_seed).spawn(3)
    grid = _grid(size * _SUPERSAMPLE)
    anatomy = _xray_anatomy if scene.modality == "xray" else _cross_section
    img = anatomy(grid, scene, rng)
    for finding in scene.findings:
        _draw_finding(img, grid, finding, scene, finding_rng)
    img = _blur(img, _BLUR[scene.modality] * _SUPERSAMPLE)
    img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))  # (size, size)
    if scene.modality == "mri":  # coil inhomogeneity: a smooth brightness ramp across the image
        angle, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.35)
        xs, ys = _grid(size)
        img = img * (1 + strength * ((xs - 0.5) * np.cos(angle) + (ys - 0.5) * np.sin(angle)))
    st = scene.style
    img = st.offset + st.gain * np.clip(img, 0, None) ** st.gamma
    img = img + noise_rng.normal(0.0, _NOISE[scene.modality] * st.noise, img.shape)
    return np.asarray(np.clip(img * 255 + 0.5, 0, 255), dtype=np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
    """A (H, W) uint8 array as an 8-bit grayscale PNG (what Pillow opens as mode "L").

    Written by hand with zlib: byte-identical everywhere, and no ``io`` import (platform/core/io.py shadows the
    standard module for type checkers that read platform/ as a folder of top-level modules).
    """
    height, width = pixels.shape
    pixels = pixels.astype(np.uint8)
    up = np.diff(pixels, axis=0, prepend=np.zeros((1, width), np.uint8))  # "Up" filter: row minus row above
    rows = np.hstack([np.full((height, 1), 2, np.uint8), up])  # each row starts with its filter type (2)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@functools.lru_cache(maxsize=4)
def _grid(side: int) -> Grid:
    centres = (np.arange(side, dtype=np.float32) + 0.5) / side
    xs, ys = np.meshgrid(centres, centres)  # (side, side) each
    return xs, ys


def _polar(grid: Grid, cx: float, cy: float, rx: float, ry: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised elliptic radius and angle around (cx, cy): rho < 1 inside the ellipse."""
    xs, ys = grid
    dx, dy = (xs - cx) / rx, (ys - cy) / ry
    return np.sqrt(dx * dx + dy * dy), np.arctan2(dy, dx)


def _cross_section(grid: Grid, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """CT / MRI: an axial slice. Layers are painted outside-in; the palette gives each tissue its grey."""
    tone = _PALETTE[scene.modality]
    st = scene.style
    rx, ry = (r * st.scale for r in _BODY[scene.organ])
    rho, phi = _polar(grid, st.cx, st.cy, rx, ry)
    img = np.full(rho.shape, tone["air"], dtype=np.float32)
    img[rho < 1] = tone["fat"]  # subcutaneous fat / scalp: the outermost layer
    layers = {"chest": _chest_slice, "brain": _brain_slice, "abdomen": _abdomen_slice}[scene.organ]
    for mask, tissue in layers(grid, rho, phi, scene, rng):
        img[mask] = tone[tissue]
    return img


def _chest_slice(grid: Grid, rho: np.ndarray, phi: np.ndarray, scene: Scene, rng: np.random.Generator) -> Layers:
    st, (rx, ry) = scene.style, (r * scene.style.scale for r in _BODY["chest"])
    ribs = np.cos(14 * phi + rng.uniform(0, 2 * np.pi)) > -0.2
    yield (rho > 0.84) & (rho < 0.93) & ribs, "bone"
    yield rho < 0.84, "lung"
    yield _polar(grid, st.cx, st.cy + 0.01, 0.11, 0.075)[0] < 1, "heart"  # small: clear of upper / lower
    yield _polar(grid, st.cx, st.cy + 0.8 * ry, 0.05, 0.05)[0] < 1, "spine"
    for _ in range(rng.integers(2, 6)):  # vessels: tiny dots a nodule must be told apart from
        angle, r = rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.75)
        x, y = st.cx + r * 0.84 * rx * np.cos(angle), st.cy + r * 0.84 * ry * np.sin(angle)
        yield _polar(grid, x, y, 0.012, 0.012)[0] < 1, "vessel"


def _brain_slice(grid: Grid, rho: np.ndarray, phi: np.ndarray, scene: Scene, rng: np.random.Generator) -> Layers:
    st = scene.style
    yield (rho > 0.85) & (rho < 0.94), "bone"  # skull
    yield rho <= 0.85, "grey"
    yield rho < 0.62 + 0.04 * np.sin(7 * phi + rng.uniform(0, 6.3)), "white"
    for side in (-1, 1):  # lateral ventricles
        yield _polar(grid, st.cx + side * 0.04, st.cy, 0.025, 0.08)[0] < 1, "csf"


def _abdomen_slice(grid: Grid, rho: np.ndarray, phi: np.ndarray, scene: Scene, rng: np.random.Generator) -> Layers:
    st, ry = scene.style, _BODY["abdomen"][1] * scene.style.scale
    yield (rho > 0.88) & (rho < 0.94), "muscle"
    yield rho <= 0.88, "soft"
    yield _polar(grid, st.cx - 0.13, st.cy - 0.07, 0.2, 0.15)[0] < 1, "liver"  # on the image left
    for side in (-1, 1):
        yield _polar(grid, st.cx + side * 0.14, st.cy + 0.6 * ry, 0.04, 0.055)[0] < 1, "kidney"
    yield _polar(grid, st.cx, st.cy + 0.74 * ry, 0.045, 0.045)[0] < 1, "spine"
    for _ in range(rng.integers(1, 5)):  # bowel gas near the centre
        x, y = st.cx + rng.uniform(-0.1, 0.1), st.cy + rng.uniform(-0.05, 0.08)
        yield _polar(grid, x, y, rng.uniform(0.01, 0.02), rng.uniform(0.01, 0.02))[0] < 1, "gas"


def _xray_anatomy(grid: Grid, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """A frontal projection: intensities add up (bone over lung stays visible), air outside is dark."""
    st, (xs, ys) = scene.style, grid
    rho, _ = _polar(grid, st.cx, st.cy, *(r * st.scale for r in _XRAY_BODY))
    img = np.where(rho < 1, 0.48, 0.03).astype(np.float32)
    spine = np.abs(xs - st.cx) < 0.045
    vertebrae = np.cos(ys * 70 + rng.uniform(0, 6.3)) > -0.6
    img[spine & vertebrae & (rho < 1)] += 0.15
    if scene.organ == "chest":
        for side in (-1, 1):
            lung = _polar(grid, st.cx + side * 0.2, st.cy - 0.03, 0.16, 0.3)[0] < 1
            img[lung] -= 0.32
        ribs = np.cos(40 * (ys - 0.9 * (xs - st.cx) ** 2) + rng.uniform(0, 6.3)) > 0.7
        img[ribs & (rho < 1) & ~spine] += 0.12
    else:
        pelvis = _polar(grid, st.cx, st.cy + 0.42, 0.3, 0.14)[0]
        img[(pelvis > 0.8) & (pelvis < 1)] += 0.2
        for _ in range(rng.integers(3, 8)):  # bowel gas
            x, y = st.cx + rng.uniform(-0.3, 0.3), st.cy + rng.uniform(-0.25, 0.25)
            img[_polar(grid, x, y, rng.uniform(0.015, 0.03), rng.uniform(0.012, 0.025))[0] < 1] -= 0.15
    return img


def _draw_finding(img: np.ndarray, grid: Grid, finding: Finding, scene: Scene, rng: np.random.Generator) -> None:
    core, rim = _FINDING_LOOK[scene.modality][finding.kind]
    if finding.kind == "effusion":
        regions = [(_effusion_mask(grid, finding, scene), core)]
    else:
        rho, phi = _polar(grid, finding.x, finding.y, finding.size, finding.size)
        if finding.kind == "mass":  # lobulated outline
            a, b = rng.uniform(0, 2 * np.pi, size=2)
            rho = rho / (1 + 0.15 * np.sin(3 * phi + a) + 0.08 * np.sin(5 * phi + b))
        regions = [(rho < 1, core)]
        if rim is not None:  # a cyst: the inner 70% of the radius is the core, the rest its wall
            regions = [(rho < 0.7, core), ((rho >= 0.7) & (rho < 1), rim)]
    for mask, value in regions:
        if scene.modality == "xray":  # a projection: the finding adds to (or takes from) what lies under it
            img[mask] += value
        else:
            img[mask] = value


def _effusion_mask(grid: Grid, finding: Finding, scene: Scene) -> np.ndarray:
    """A crescent of fluid hugging the wall on the finding's side, thickest on its axis, tapering off."""
    fx, fy = _field_radii(scene.modality, scene.organ, scene.style)
    rho, phi = _polar(grid, scene.style.cx, scene.style.cy, fx, fy)
    axis = np.arctan2((finding.y - scene.style.cy) / fy, (finding.x - scene.style.cx) / fx)
    offset = np.angle(np.exp(1j * (phi - axis)))  # angle from the axis, in (-pi, pi]
    half_span = 0.9  # radians either side of the axis
    taper = np.where(np.abs(offset) < half_span, np.cos(offset * np.pi / 2 / half_span), 0.0)  # 1 on the axis
    thickness = 2 * finding.size / min(fx, fy)
    return (rho < 1) & (rho > 1 - thickness * taper) & (taper > 0)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding."""
    radius = max(1, int(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    n = img.shape[0]
    padded = np.pad(img, ((radius, radius), (0, 0)), mode="edge")
    img = sum((w * padded[i : i + n] for i, w in enumerate(taps)), np.zeros_like(img))
    padded = np.pad(img, ((0, 0), (radius, radius)), mode="edge")
    img = sum((w * padded[:, i : i + n] for i, w in enumerate(taps)), np.zeros_like(img))
    return img


def contact_sheet(scenes: Sequence[Scene], path: str | Path, *, size: int = 64, title: str = "") -> Path:
    """A PNG grid of rendered scenes, each titled with its truth (modality, organ, findings)."""
    from matplotlib.figure import Figure  # Agg canvas, no pyplot: no global backend or figure state

    side = int(np.ceil(np.sqrt(len(scenes))))
    fig = Figure(figsize=(2.2 * side, 2.7 * side))
    axes = fig.subplots(side, side, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, scene in zip(axes.flat[: len(scenes)], scenes, strict=True):
        ax.imshow(render_scene(scene, size=size), cmap="gray", vmin=0, vmax=255)
        found = [f"{f.kind} {f.position}" for f in scene.findings]
        lines = [", ".join(found[i : i + 2]) for i in range(0, len(found), 2)] or ["normal"]
        ax.set_title("\n".join([f"{MODALITY_NAME[scene.modality]} {scene.organ}", *lines]), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)
