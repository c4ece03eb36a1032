"""Continuous 3D lumbar anatomy in scanner (world, mm, RAS) coordinates.

The spine's centre line is a circular arc from L1 to S1 in the subject's sagittal plane
(lordosis: convex anteriorly), continued straight above and below, so every point has exact
curvilinear coordinates: ``u`` (arc length, superior +),
``v`` (distance from the arc, anterior +) and ``w`` (left-right, right +). Vertebral bodies and
discs are stacked along ``u``; their cross-sections are super-ellipses in (``v``, ``w``) with a
posterior (kidney-bean) indentation for the vertebrae; disc surfaces are concave (thicker at
the centre); a 0.5-1.0 mm cartilage endplate lies between each disc and each neighbour;
vertebrae end at the endplates, with a bony endplate and a cortical shell: a signal void
(cortical bone gives no signal on these sequences), rendered as the fraction of each voxel it
fills, so a thin dark line on fine grids and a faint darkening on coarse ones. Around the
column: spinal canal, posterior elements, paraspinal and psoas muscles, subcutaneous fat (from
BMI), other soft tissue and air.
Each disc is a known smooth deformation of its level's canonical disc (``discs``): membership,
nucleus pattern and disc texture are evaluated in the canonical coordinates.

``evaluate`` labels any set of world points (voxel centres of any grid, in any orientation)
without a reference grid, which is what makes every series sample the same subject.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spineqprep.synth import discs as dsc
from spineqprep.synth import labels as lab
from spineqprep.synth.cohort import Lesion, Participant, Visit, rng_for

#: Healthy dimensions (mm) per modelled vertebra T11 .. S1 and disc T11T12 .. L5S1.
_VERT_HALF_HEIGHT = (11.5, 12.0, 12.5, 13.0, 13.5, 13.5, 13.0, 20.0)
_VERT_HALF_DEPTH = (14.0, 14.5, 15.0, 16.0, 16.5, 17.0, 17.5, 17.0)
_VERT_HALF_WIDTH = (19.0, 20.0, 21.0, 22.5, 24.0, 25.0, 26.0, 25.0)
_PSOAS_RADIUS = (0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 22.0, 0.0)
_DISC_HALF_HEIGHT = (3.0, 3.3, 3.6, 4.0, 4.4, 4.8, 4.4)
_SUPERELLIPSE = dsc.SUPERELLIPSE
_CEP_EXTENT = 0.92  # endplates cover this fraction of the disc radius (not the ring apophysis)
#: Cortical bone of the vertebral bodies (mm): the bony endplate under each disc and the shell
_BONY_ENDPLATE_MM = 1.0
_SHELL_MM = 0.6
#: Reference anatomy of the canonical discs: scale 1, modified grade 1, mean endplate thickness,
#: mean concavity and the grade-1 bulge.
_CANONICAL_CEP = 0.75
_CANONICAL_CONCAVITY = 1.15
_CANONICAL_BULGE = 1.02
_TEXTURE_MODES = 24
_CANAL_GAP = 2.0  # posterior longitudinal ligament and epidural space (mm)


@dataclass(frozen=True)
class Anatomy:
    """Geometry of one participant at one visit (lengths in mm, arrays superior -> inferior)."""

    radius: float  # of the lordotic arc
    rotation: np.ndarray  # 3 x 3, subject frame -> world
    origin: np.ndarray  # world position of the arc origin (centre of L3)
    vert_u: np.ndarray
    vert_half_height: np.ndarray
    vert_half_depth: np.ndarray
    vert_half_width: np.ndarray
    psoas_radius: np.ndarray
    disc_u: np.ndarray
    disc_half_height: np.ndarray  # at the rim; the centre adds ``disc_concavity``
    disc_concavity: np.ndarray
    disc_bulge: np.ndarray
    nucleus_radius: np.ndarray
    nucleus_blur: np.ndarray
    cep_superior_mm: np.ndarray
    cep_inferior_mm: np.ndarray
    canal_half_ap: float
    canal_half_lr: float
    muscle_depth: float
    spinous_length: float
    fat_mm: float
    belly_mm: float
    half_body_width: float
    lesions: tuple[Lesion, ...]
    texture_k: np.ndarray  # (modes, 3) wave vectors, rad/mm
    texture_phase: np.ndarray
    disc_shapes: dsc.DiscShapes  # per-disc smooth displacement off the canonical disc

    # ---- coordinates -------------------------------------------------------------------
    def _ends(self) -> tuple[float, float]:
        """Arc positions where the lordotic arc hands over to straight lines (L1, S1 centres)."""
        return float(self.vert_u[lab.VERTEBRAE.index("L1")]), float(
            self.vert_u[lab.VERTEBRAE.index("S1")])

    def _line(self, u_end: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Point, tangent and normal (subject y, z) of the straight continuation at ``u_end``."""
        theta = u_end / self.radius
        point = np.array([self.radius * np.cos(theta) - self.radius, self.radius * np.sin(theta)])
        return point, np.array([-np.sin(theta), np.cos(theta)]), np.array(
            [np.cos(theta), np.sin(theta)])

    def local(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """World points (N, 3) -> (u, v, w, subject-frame points). The centre line is the arc
        between the L1 and S1 centres, continued by its tangents above and below."""
        p = (np.asarray(points, np.float64) - self.origin) @ self.rotation
        dy = p[:, 1] + self.radius
        u = self.radius * np.arctan2(p[:, 2], dy)
        v = np.hypot(dy, p[:, 2]) - self.radius
        for u_end, beyond in zip(self._ends(), (u > self._ends()[0], u < self._ends()[1]),
                                 strict=True):
            point, tangent, normal = self._line(u_end)
            d = p[beyond][:, 1:] - point
            u[beyond] = u_end + d @ tangent
            v[beyond] = d @ normal
        return u, v, p[:, 0], p

    def world(self, u: np.ndarray, v: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Curvilinear (u, v, w) -> world points (N, 3)."""
        u = np.asarray(u, np.float64)
        v = np.asarray(v, np.float64) * np.ones_like(u)
        top, bottom = self._ends()
        clamped = np.clip(u, bottom, top)
        theta = clamped / self.radius
        r = self.radius + v
        yz = np.stack([r * np.cos(theta) - self.radius, r * np.sin(theta)], axis=-1)
        for u_end, beyond in ((top, u > top), (bottom, u < bottom)):
            _, tangent, _ = self._line(u_end)
            yz[beyond] += np.outer(u[beyond] - u_end, tangent)
        p = np.column_stack([np.asarray(w, np.float64) * np.ones_like(u), yz])
        return p @ self.rotation.T + self.origin

    def frame(self, u: float) -> np.ndarray:
        """World unit vectors (rows) at arc position ``u``: superior tangent, anterior normal,
        right."""
        top, bottom = self._ends()
        theta = float(np.clip(u, bottom, top)) / self.radius
        local = np.array([[0.0, -np.sin(theta), np.cos(theta)],
                          [0.0, np.cos(theta), np.sin(theta)],
                          [1.0, 0.0, 0.0]])
        return local @ self.rotation.T

    def disc_centre(self, k: int) -> np.ndarray:
        return self.world(np.array([self.disc_u[k]]), np.zeros(1), np.zeros(1))[0]

    def vertebra_centre(self, j: int) -> np.ndarray:
        return self.world(np.array([self.vert_u[j]]), np.zeros(1), np.zeros(1))[0]

    def disc_height(self, k: int) -> float:
        """Central (maximal) height of disc ``k`` in mm."""
        return float(2 * (self.disc_half_height[k] + self.disc_concavity[k]))

    def nucleus_centre_v(self, k: int) -> float:
        """The nucleus sits slightly posterior in the disc."""
        return -0.08 * self.disc_bulge[k] * float(np.interp(
            self.disc_u[k], self.vert_u[::-1], self.vert_half_depth[::-1]))

    def texture(self, p_subject: np.ndarray) -> np.ndarray:
        """Smooth random field (unit variance, 3-12 mm wavelengths) rigid with the anatomy."""
        phase = p_subject.astype(np.float32) @ self.texture_k.T.astype(np.float32)
        phase += self.texture_phase.astype(np.float32)
        return np.float32(np.sqrt(2.0 / len(self.texture_phase))) * np.cos(phase).sum(axis=1)

    # ---- discs as deformed canonical discs ---------------------------------------------
    def _canonical(self, k: np.ndarray, du: np.ndarray, v: np.ndarray, w: np.ndarray,
                   half_depth: np.ndarray, half_width: np.ndarray) -> np.ndarray:
        """Disc-local coordinates of disc ``k[i]`` -> deformed normalised coordinates n'."""
        n = dsc.normalise(du, v, w, half_width, half_depth, self.disc_half_height[k],
                          self.disc_concavity[k])
        return n + self.disc_shapes.displacement(k, n)

    def disc_texture(self, k: np.ndarray, n_prime: np.ndarray) -> np.ndarray:
        """Texture of disc ``k[i]`` at deformed normalised points: the field sampled at the
        canonical millimetres (shifted per disc), so it moves with the disc's deformation."""
        out = np.empty(len(k), np.float32)
        for level in np.unique(k):
            sel = k == level
            c = canonical_disc(int(level)).embed(n_prime[sel])
            out[sel] = self.texture(c + np.array([0.0, 0.0, self.disc_u[level]]))
        return out

    def disc_dims(self, k: int, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Half width and half depth (mm, with the bulge) of disc ``k`` at arc positions u."""
        rev = slice(None, None, -1)
        return (np.interp(u, self.vert_u[rev], self.vert_half_width[rev]) * self.disc_bulge[k],
                np.interp(u, self.vert_u[rev], self.vert_half_depth[rev]) * self.disc_bulge[k])

    def to_canonical(self, k: int, points: np.ndarray) -> np.ndarray:
        """World points (N, 3) -> canonical millimetres (atlas space) of disc ``k``."""
        u, v, w, _ = self.local(points)
        aw, av = self.disc_dims(k, u)
        n = self._canonical(np.full(len(u), k), u - self.disc_u[k], v, w, av, aw)
        return canonical_disc(k).embed(n)

    def from_canonical(self, k: int, c: np.ndarray) -> np.ndarray:
        """Canonical millimetres (N, 3) of disc ``k`` -> world points: the native position
        every atlas-space point comes from (inverse of ``to_canonical``)."""
        n = self.disc_shapes.invert(k, canonical_disc(k).normalise(c))
        rho = dsc.superellipse(n[:, 0], n[:, 1])
        du = n[:, 2] * dsc.half_height(rho, self.disc_half_height[k], self.disc_concavity[k])
        aw, av = self.disc_dims(k, self.disc_u[k] + du)
        return self.world(self.disc_u[k] + du, n[:, 1] * av, n[:, 0] * aw)

    # ---- labelling ---------------------------------------------------------------------
    def evaluate(self, points: np.ndarray, footprint_mm: float = 0.0) -> Sample:
        """Label world points (N, 3) with the detailed labels of ``labels``.

        ``footprint_mm``: the extent of the voxel each point stands for; the cortical bone's
        share of it (``Sample.pd_scale`` = 1 - share) is its overlap with that extent around
        the point, along the distance to the bone surface (0: a point sample)."""
        u, v, w, p = self.local(points)
        n = len(u)
        rev = slice(None, None, -1)
        av = np.interp(u, self.vert_u[rev], self.vert_half_depth[rev])
        aw = np.interp(u, self.vert_u[rev], self.vert_half_width[rev])
        out = np.zeros(n, np.int16)

        # body outline, fat, muscles
        ry, rx = self.canal_half_ap, self.canal_half_lr
        v_canal = -(av + _CANAL_GAP + ry)
        v_post = v_canal - ry - self.muscle_depth - self.fat_mm
        v_ant = av + self.belly_mm
        vb, ab, bb = (v_ant + v_post) / 2, (v_ant - v_post) / 2, self.half_body_width
        out[((v - vb) / ab) ** 2 + (w / bb) ** 2 <= 1] = lab.FAT
        inner = ((v - vb) / (ab - self.fat_mm)) ** 2 + (w / (bb - self.fat_mm)) ** 2 <= 1
        out[inner] = lab.SOFT
        half_muscle = self.muscle_depth / 2
        paraspinal = (((v - (v_canal - ry - half_muscle)) / half_muscle) ** 2
                      + ((np.abs(w) - (rx + 17.0)) / 24.0) ** 2) <= 1
        rp = np.interp(u, self.vert_u[rev], self.psoas_radius[rev])
        psoas = (rp > 0) & (((v + 0.15 * av) ** 2 + (np.abs(w) - aw - 0.8 * rp) ** 2)
                            <= rp ** 2)
        out[inner & (paraspinal | psoas)] = lab.MUSCLE

        # posterior elements around the canal, per nearest vertebra
        jn = np.argmin(np.abs(u[:, None] - self.vert_u[None, :]), axis=1)
        du_v = u - self.vert_u[jn]
        hv = self.vert_half_height[jn]
        canal = ((v - v_canal) / ry) ** 2 + (w / rx) ** 2 <= 1
        pedicle = ((np.abs(w) >= 0.7 * rx) & (np.abs(w) <= rx + 5) & (v >= v_canal - 0.2 * ry)
                   & (v <= -0.9 * av) & (np.abs(du_v - 0.25 * hv) <= 0.35 * hv))
        arch = ((((v - v_canal) / (ry + 6)) ** 2 + (w / (rx + 6)) ** 2 <= 1) & (v <= v_canal)
                & (np.abs(du_v + 0.1 * hv) <= 0.45 * hv))
        depth = (v_canal - ry) - v
        spinous = ((depth >= 0) & (depth <= self.spinous_length) & (np.abs(w) <= 3.5)
                   & (np.abs(du_v + 0.15 * hv + 0.25 * depth) <= 0.45 * hv))
        out[(pedicle | arch | spinous) & ~canal] = lab.POSTERIOR
        out[canal] = lab.CANAL

        # vertebral bodies, discs and cartilage endplates, per nearest disc
        k = np.argmin(np.abs(u[:, None] - self.disc_u[None, :]), axis=1)
        bulge = self.disc_bulge[k]
        n_disc = self._canonical(k, u - self.disc_u[k], v, w, av * bulge, aw * bulge)
        rho_d = dsc.superellipse(n_disc[:, 0], n_disc[:, 1])
        half = dsc.half_height(rho_d, self.disc_half_height[k], self.disc_concavity[k])
        du = n_disc[:, 2] * half  # distance along u in the deformed disc's frame
        cep = np.where(du > 0, self.cep_superior_mm[k], self.cep_inferior_mm[k])
        in_plate = rho_d <= _CEP_EXTENT
        in_disc = (rho_d <= 1) & (np.abs(du) <= half)
        in_cep = in_plate & ~in_disc & (np.abs(du) <= half + cep)
        beyond = np.abs(du) - half - np.where(in_plate, cep, 0.0)  # distance past the surface
        jv = np.where(du > 0, k, k + 1)
        top, bottom = self.vert_u[0] + self.vert_half_height[0], \
            self.vert_u[-1] - self.vert_half_height[-1]
        a_post = av * (1 - 0.12 * np.exp(-(w / (0.35 * aw)) ** 2))
        rho_v = _superellipse(v, w, np.where(v < 0, a_post, av), aw)
        in_vert = (rho_v <= 1) & ((rho_d > 1) | (beyond > 0)) & (u <= top) & (u >= bottom)
        out[in_vert] = np.array([lab.vertebra(j) for j in range(len(self.vert_u))],
                                np.int16)[jv[in_vert]]
        tex = np.zeros(n, np.float32)  # only where there is tissue: air needs none
        tissue = out != 0
        tex[tissue] = self.texture(p[tissue])
        if in_disc.any():  # the disc texture is carried by the disc's deformation
            tex[in_disc] = self.disc_texture(k[in_disc], n_disc[in_disc])
        for lesion in self.lesions:
            sel = in_vert & (jv == lesion.vertebra) & (k == lesion.disc)
            v0 = lesion.ap_offset * av[sel]
            blob = ((beyond[sel] / lesion.depth_mm) ** 2 + ((v[sel] - v0) / lesion.ap_extent_mm)
                    ** 2 + (w[sel] / lesion.lr_extent_mm) ** 2)
            idx = np.flatnonzero(sel)[blob <= 1 + 0.3 * tex[sel]]
            out[idx] = lab.modic(lesion.modic_type, lesion.vertebra)

        # cortical bone: distance into the body from its endplate (within its cross-section)
        # and from its outline (between its endplates), each covered by a layer of bone
        rim = (1 - rho_v) * np.minimum(np.where(v < 0, a_post, av), aw)
        body = (u <= top) & (u >= bottom)
        bone = np.maximum(
            np.where((rho_v <= 1) & body, _layer(beyond, _BONY_ENDPLATE_MM, footprint_mm), 0.0),
            np.where(body & ((rho_d > 1) | (beyond > 0)), _layer(rim, _SHELL_MM, footprint_mm),
                     0.0))

        frac = np.zeros(n, np.float32)
        if in_disc.any():
            kd = k[in_disc]
            frac[in_disc] = dsc.nucleus_fraction(n_disc[in_disc], self.nucleus_radius[kd],
                                                 self.nucleus_blur[kd])
            nuc = np.array([lab.nucleus(i) for i in range(len(self.disc_u))], np.int16)
            ann = np.array([lab.annulus(i) for i in range(len(self.disc_u))], np.int16)
            out[in_disc] = np.where(frac[in_disc] >= 0.5, nuc[kd], ann[kd])
        if in_cep.any():
            sup = np.array([lab.cep_superior(i) for i in range(len(self.disc_u))], np.int16)
            inf = np.array([lab.cep_inferior(i) for i in range(len(self.disc_u))], np.int16)
            out[in_cep] = np.where(du[in_cep] > 0, sup[k[in_cep]], inf[k[in_cep]])
        return Sample(out, frac, tex, (1.0 - bone).astype(np.float32))


@dataclass(frozen=True)
class Sample:
    """Labels of a set of points, the nucleus fraction (0 outside discs), the texture and the
    share of each point's voxel that is not cortical bone (scales its proton density)."""

    labels: np.ndarray
    nucleus_fraction: np.ndarray
    texture: np.ndarray
    pd_scale: np.ndarray


def _layer(depth: np.ndarray, thickness: float, footprint: float) -> np.ndarray:
    """Share of [depth - footprint / 2, depth + footprint / 2] inside [0, thickness]: the part
    of a voxel (centre ``depth`` mm below a surface) that a layer under the surface fills."""
    if footprint <= 0:
        return ((depth >= 0) & (depth <= thickness)).astype(np.float64)
    low, high = depth - footprint / 2, depth + footprint / 2
    return np.clip(np.minimum(high, thickness) - np.maximum(low, 0.0), 0.0, None) / footprint


def _superellipse(v: np.ndarray, w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return dsc.superellipse(v / a, w / b)


def canonical_disc(k: int) -> dsc.CanonicalDisc:
    """Canonical disc of ``DISCS[k]``: the disc of the reference anatomy (no scatter), its
    half depth / width interpolated between the vertebrae as ``Anatomy.evaluate`` does."""
    up = _DISC_HALF_HEIGHT[k] + _CANONICAL_CEP + _VERT_HALF_HEIGHT[k]
    down = _DISC_HALF_HEIGHT[k] + _CANONICAL_CEP + _VERT_HALF_HEIGHT[k + 1]
    t = down / (up + down)

    def between(values: tuple[float, ...]) -> float:
        return values[k + 1] + t * (values[k] - values[k + 1])

    return dsc.CanonicalDisc(half_width=between(_VERT_HALF_WIDTH) * _CANONICAL_BULGE,
                             half_depth=between(_VERT_HALF_DEPTH) * _CANONICAL_BULGE,
                             rim_half_height=_DISC_HALF_HEIGHT[k],
                             concavity=_CANONICAL_CONCAVITY)


def rotation_matrix(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def build_anatomy(person: Participant, visit: Visit, seed: int) -> Anatomy:
    """The geometry of ``person`` at ``visit``: the body is drawn once per participant (seeded
    by participant), the disc heights follow the visit's grades and the position in the
    scanner changes a little per visit."""
    rng = rng_for(seed, "anatomy", person.index)
    scale = rng.normal(1.0, 0.04) * (1.04 if person.sex == "M" else 0.96)
    nv, nd = len(lab.VERTEBRAE), len(lab.DISCS)
    jitter = lambda size: rng.normal(1.0, 0.03, size)  # noqa: E731
    half_h = np.array(_VERT_HALF_HEIGHT) * scale * jitter(nv)
    depth = np.array(_VERT_HALF_DEPTH) * scale * jitter(nv)
    width = np.array(_VERT_HALF_WIDTH) * scale * jitter(nv)
    healthy = np.array(_DISC_HALF_HEIGHT) * scale * rng.normal(1.0, 0.06, nd)
    concavity = rng.uniform(0.8, 1.5, nd)
    cep_sup, cep_inf = rng.uniform(0.5, 1.0, nd), rng.uniform(0.5, 1.0, nd)
    lordosis = float(np.clip(rng.normal(45.0, 6.0), 30.0, 60.0))
    canal = (rng.uniform(7.0, 9.0) * scale, rng.uniform(10.0, 12.0) * scale)
    muscle_depth = rng.uniform(40.0, 55.0) * scale
    spinous = rng.uniform(26.0, 34.0) * scale
    belly = rng.uniform(90.0, 115.0) * scale + 1.3 * person.fat_mm
    body_width = rng.uniform(130.0, 150.0) * scale + person.fat_mm
    texture_dir = rng.normal(size=(_TEXTURE_MODES, 3))
    texture_dir /= np.linalg.norm(texture_dir, axis=1, keepdims=True)
    texture_k = texture_dir * (2 * np.pi / rng.uniform(3.0, 12.0, (_TEXTURE_MODES, 1)))
    texture_phase = rng.uniform(0, 2 * np.pi, _TEXTURE_MODES)

    pose = rng_for(seed, "pose", person.index, visit.months)
    rotation = rotation_matrix(pose.normal(0, 4.0), pose.normal(0, 1.5), pose.normal(0, 1.5))
    origin = np.array([pose.normal(0, 4.0), -35.0 + pose.normal(0, 5.0), pose.normal(0, 8.0)])

    disc_half = healthy * np.array([d.height_factor for d in visit.discs])
    # stack from the sacrum upwards: vertebra surface = disc rim half height + endplate
    vert_u = np.zeros(nv)
    disc_u = np.zeros(nd)
    for k in range(nd - 1, -1, -1):
        disc_u[k] = vert_u[k + 1] + half_h[k + 1] + cep_inf[k] + disc_half[k]
        vert_u[k] = disc_u[k] + disc_half[k] + cep_sup[k] + half_h[k]
    ref = vert_u[lab.VERTEBRAE.index("L3")]
    vert_u, disc_u = vert_u - ref, disc_u - ref
    arc = vert_u[lab.VERTEBRAE.index("L1")] - vert_u[lab.VERTEBRAE.index("S1")]
    degeneration = np.array([d.degeneration for d in visit.discs])
    return Anatomy(
        radius=float(arc / np.deg2rad(lordosis)), rotation=rotation, origin=origin,
        vert_u=vert_u, vert_half_height=half_h, vert_half_depth=depth, vert_half_width=width,
        psoas_radius=np.array(_PSOAS_RADIUS) * scale, disc_u=disc_u, disc_half_height=disc_half,
        disc_concavity=concavity * np.array([d.height_factor for d in visit.discs]),
        disc_bulge=1.02 + 0.05 * degeneration,
        nucleus_radius=np.array([d.nucleus_radius for d in visit.discs]),
        nucleus_blur=np.array([d.nucleus_blur for d in visit.discs]),
        cep_superior_mm=cep_sup, cep_inferior_mm=cep_inf, canal_half_ap=canal[0],
        canal_half_lr=canal[1], muscle_depth=muscle_depth,
        spinous_length=spinous, fat_mm=person.fat_mm, belly_mm=belly,
        half_body_width=body_width, lesions=person.lesions, texture_k=texture_k,
        texture_phase=texture_phase,
        disc_shapes=dsc.draw_shapes(rng_for(seed, "disc-shape", person.index), nd))
