#!/usr/bin/env python3
"""pusim: physics-based musculoskeletal ultrasound cases simulated with pymust (MUST).

A second, independent image source for sonoguide, next to the project's own phantom
(src/sim/phantom.rs). Every image is formed from first principles:

1. A randomised MSK scene in the image plane (mm): skin, subcutaneous fat with septa, fascia,
   pennate muscle with perimysium striations, a fibrillar tendon (anisotropic), bone surfaces
   with articular cartilage, two bone ends with a fluid-filled joint recess, effusions/bursae,
   vessels and (optionally) nerves. Sizes are drawn from ranges reported in the literature
   (see CITATIONS; each range names its source).
2. Point scatterers (random positions; amplitude = sqrt(backscatter) x Gaussian), plus
   coherent line reflectors for the bone cortex (specular), its reverberations / comet tails,
   and a clutter floor. Attenuation beyond pymust's uniform 0.5 dB/cm/MHz (fluid: less,
   giving posterior enhancement; bone: a transmission loss, giving a partial shadow) is
   integrated along the beam and applied to the scatterer amplitudes.
3. Radio-frequency channel data from pymust's SIMUS model (getparam probes; 1-15 compounded
   plane waves for the linear arrays, 1-9 diverging waves for the convex array). To share the
   expensive element/scatterer exponentials between transmits, `simus_multi` evaluates
   pymust.pfield's SIMUS branch for all transmits in one pass; `--engine simus` calls
   pymust.simus once per transmit instead (same result, several times slower; see
   `--selftest`, which compares the two and the beamformers).
4. pymust.rf2iq demodulation, delay-and-sum beamforming (pymust.dasmtx's definition: transmit
   distance = first arrival over the transmitting aperture, receive f-number aperture, linear
   interpolation of I/Q with phase rotation; `--engine simus` uses pymust.dasmtx itself), coherent
   compounding, envelope, depth-gain (TGC) with a random error curve, gain, log compression over
   a random dynamic range to 8 bits (pymust.bmode's law). Convex images are beamformed straight
   onto the rectangular display grid (the scan-converted fan); outside the fan is black.

Usage:
    python3 tools/pusim/simulate.py --out DIR --set tune|test --count N --seed S \
        [--probes L11-5v,L22-14v,C5-2v] [--scenes joint,bone,soft_tissue] [--jobs 1]

Writes NAME.dcm, NAME.truth.png, NAME.truth.json per case (and, for --set test,
NAME_g+6/_g-6/_dr40/_dr70 variants into --perturbed-out).
"""

import os

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
           "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pymust  # noqa: E402
from pymust import utils as mu  # noqa: E402
from pymust.getpulse import getpulse as _getpulse  # noqa: E402

logging.getLogger().setLevel(logging.ERROR)

try:
    from importlib.metadata import version as _version
    PYMUST_VERSION = _version("pymust")
except Exception:  # noqa: BLE001
    PYMUST_VERSION = "unknown"

# --------------------------------------------------------------------------------------------
# Literature
# --------------------------------------------------------------------------------------------

CITATIONS = {
    "garcia2022": "Garcia D. SIMUS: an open-source simulator for medical ultrasound imaging. "
                  "Part I: theory & examples. Comput Methods Programs Biomed 2022;218:106726.",
    "perrot2021": "Perrot V, Polichetti M, Varray F, Garcia D. So you think you can DAS? A viewpoint "
                  "on delay-and-sum beamforming. Ultrasonics 2021;111:106309.",
    "montaldo2009": "Montaldo G, Tanter M, Bercoff J, Benech N, Fink M. Coherent plane-wave "
                    "compounding for very high frame rate ultrasonography and transient "
                    "elastography. IEEE Trans Ultrason Ferroelectr Freq Control 2009;56:489-506.",
    "verasonics_l22": "Verasonics computeTrans: L22-14v, 128 elements, 0.10 mm pitch, 0.08 mm "
                      "element width, elevation focus 8 mm, -6 dB band 14-22 MHz (centre 18 MHz).",
    "szabo2014": "Szabo TL. Diagnostic Ultrasound Imaging: Inside Out. 2nd ed. Academic Press; 2014 "
                 "(attenuation: soft tissue ~0.5, muscle ~1, fat ~0.6, blood ~0.2, water ~0.002, "
                 "bone ~20 dB/cm/MHz; backscatter of blood 30-40 dB below tissue).",
    "goss1978": "Goss SA, Johnston RL, Dunn F. Comprehensive compilation of empirical ultrasonic "
                "properties of mammalian tissues. J Acoust Soc Am 1978;64:423-457.",
    "feldman2009": "Feldman MK, Katyal S, Blackwood MS. US artifacts. RadioGraphics "
                   "2009;29:1179-1189 (shadowing, posterior enhancement, reverberation, comet tail).",
    "jacobson2018": "Jacobson JA. Fundamentals of Musculoskeletal Ultrasound. 3rd ed. Elsevier; 2018 "
                    "(normal sonographic anatomy and dimensions of MSK structures).",
    "laurent2007": "Laurent A, Mistretta F, Bottigioli D, et al. Echographic measurement of skin "
                   "thickness in adults by high frequency ultrasound to assess the appropriate "
                   "microneedle length for intradermal delivery of vaccines. Vaccine "
                   "2007;25:6423-6430 (skin 1.5-3 mm by site).",
    "crass1988": "Crass JR, van de Vegte GL, Harkavy LA. Tendon echogenicity: ex vivo study. "
                 "Radiology 1988;167:499-501 (anisotropy: echogenicity falls steeply a few "
                 "degrees off perpendicular).",
    "fornage1986": "Fornage BD. Achilles tendon: US examination. Radiology 1986;159:759-764.",
    "koivunen1995": "Koivunen-Niemela T, Parkkola K. Anatomy of the Achilles tendon (tendo "
                    "calcaneus) with respect to tendon thickness measurements. Surg Radiol Anat "
                    "1995;17:263-268 (normal AP thickness 4-7 mm).",
    "cholewinski2008": "Cholewinski JJ, Kusz DJ, Wojciechowski P, Cielinski LS, Zoladz MP. "
                       "Ultrasound measurement of rotator cuff thickness and acromio-humeral "
                       "distance in the diagnosis of subacromial impingement syndrome. Knee Surg "
                       "Sports Traumatol Arthrosc 2008;16:408-414 (supraspinatus 4-8 mm).",
    "vanholsbeeck1993": "van Holsbeeck M, Strouse PJ. Sonography of the shoulder: evaluation of "
                        "the subacromial-subdeltoid bursa. AJR 1993;160:561-564 (normal bursa "
                        "< 2 mm).",
    "schmitz2017": "Schmitz RJ, Wang HM, Polprasert DR, Kraft RA, Pietrosimone BG. Evaluation of "
                   "knee cartilage thickness: a comparison between ultrasound and magnetic "
                   "resonance imaging methods. Knee 2017;24:217-223 (femoral cartilage ~1.5-3 mm).",
    "wakefield2005": "Wakefield RJ, Balint PV, Szkudlarek M, et al. Musculoskeletal ultrasound "
                     "including definitions for ultrasonographic pathology. J Rheumatol "
                     "2005;32:2485-2487 (effusion: anechoic/hypoechoic displaceable material).",
    "nazarian1995": "Nazarian LN, Rawool NM, Martin CE, Schweitzer ME. Synovial fluid in the "
                    "hindfoot and ankle: detection of amount and distribution with US. Radiology "
                    "1995;197:275-278 (anterior ankle recess fluid, a few mm).",
    "szkudlarek2003": "Szkudlarek M, Court-Payen M, Jacobsen S, et al. Interobserver agreement in "
                      "ultrasonography of the finger and toe joints in rheumatoid arthritis. "
                      "Arthritis Rheum 2003;48:955-962 (MCP/MTP effusion grading).",
    "koski1989": "Koski JM, Anttila PJ, Isomaki HA. Ultrasonography of the adult hip joint. Scand "
                 "J Rheumatol 1989;18:113-117 (anterior capsule-to-neck distance; effusion).",
    "yoo2005": "Yoo BS, Yoon J, Ko JY, et al. Anatomical consideration of the radial artery for "
               "transradial coronary procedures: arterial diameter, branching anomaly and vessel "
               "tortuosity. Int J Cardiol 2005;101:421-427 (radial artery ~2-3 mm).",
    "wolf2006": "Wolf YG, Kobzantsev Z, Zelmanovich L. Size of normal and aneurysmal popliteal "
                "arteries: a duplex ultrasound study. J Vasc Surg 2006;43:488-492 (~5-7 mm).",
    "sandgren1999": "Sandgren T, Sonesson B, Ahlgren AR, Lanne T. The diameter of the common "
                    "femoral artery in healthy human: influence of sex, age, and body size. J Vasc "
                    "Surg 1999;29:503-510 (~8-10 mm).",
    "cartwright2008": "Cartwright MS, Passmore LV, Yoon JS, Brown ME, Caress JB, Walker FO. "
                      "Cross-sectional area reference values for nerve ultrasonography. Muscle "
                      "Nerve 2008;37:566-571 (median wrist ~7-13 mm^2, ulnar ~6, tibial ~11, "
                      "sural < 3).",
    "buchberger1992": "Buchberger W, Judmaier W, Birbamer G, Lener M, Schmidauer C. Carpal tunnel "
                      "syndrome: diagnosis with high-resolution sonography. AJR 1992;159:793-798 "
                      "(median nerve flattening ratio).",
    "silvestri1995": "Silvestri E, Martinoli C, Derchi LE, Bertolotto M, Chiaramondia M, Rosenberg "
                     "I. Echotexture of peripheral nerves: correlation between US and histologic "
                     "findings and criteria to differentiate tendons. Radiology 1995;197:291-296 "
                     "(honeycomb: hypoechoic fascicles in hyperechoic epineurium).",
    "kawakami1998": "Kawakami Y, Ichinose Y, Fukunaga T. Architectural and functional features of "
                    "human triceps surae muscles during contraction. J Appl Physiol "
                    "1998;85:398-404 (pennation angles ~15-25 deg at rest).",
}

# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------

NOMINAL_ATT = 0.5  # dB/cm/MHz: pymust's uniform attenuation and the TGC's nominal law [szabo2014]
C_SOUND = 1540.0


def probe_param(name):
    """pymust parameters of a probe (getparam, or the Verasonics L22-14v specification)."""
    if name == "L22-14v":
        # [verasonics_l22]; not in pymust 0.1.9's getparam table.
        p = mu.Param()
        p.fc = 18e6
        p.kerf = 20e-6
        p.width = 80e-6
        p.pitch = 100e-6
        p.Nelements = 128
        p.bandwidth = 44.0
        p.radius = np.inf
        p.height = 1.6e-3
        p.focus = 8e-3
    else:
        p = pymust.getparam(name)
    p.fs = 4 * p.fc
    p.c = C_SOUND
    p.attenuation = NOMINAL_ATT
    return p


PROBES = {
    # depth ranges in mm; pixel spacing chosen so that the image stays 300-480 x 250-480
    "L11-5v": dict(kind="linear", depth=(25.0, 40.0), fmhz=7.6),
    "L22-14v": dict(kind="linear", depth=(15.0, 19.0), fmhz=18.0),
    "C5-2v": dict(kind="convex", depth=(40.0, 60.0), fmhz=3.57),
}

# --------------------------------------------------------------------------------------------
# Tissue constants: backscatter power relative to muscle, attenuation dB/cm/MHz
# --------------------------------------------------------------------------------------------

ECHO = dict(SKIN=5.0, FAT=0.3, SEPTUM=3.0, FASCIA=8.0, MUSCLE=1.0, TENDON=25.0, FATPAD=0.5,
            CARTILAGE=0.04, FLUID=0.0005, BLOOD=0.0003, VESSEL_WALL=5.0, EPINEURIUM=8.0,
            FASCICLE=0.15, MARROW=1.0)
ATT = dict(SKIN=0.8, FAT=0.6, MUSCLE=1.0, TENDON=1.0, CARTILAGE=0.6, FLUID=0.002, BLOOD=0.2,
           NERVE=0.9)

LAB = dict(background=0, tendon=1, bone=2, shadow=3, joint=4, vessel=5, nerve=6)
BONE_BAND_ABOVE = 0.2
BONE_BAND_BELOW = 0.3
VESSEL_WALL_MM = 0.15


# --------------------------------------------------------------------------------------------
# Geometry: image grid <-> beam coordinates
# --------------------------------------------------------------------------------------------

class Geometry:
    """Image grid. Cartesian image-plane coordinates: X lateral mm from the reference pixel,
    Z mm below the transducer face centre (the reference row). Beam coordinates (u, d): u =
    lateral position on the face (arc length for the convex array), d = distance along the beam
    from the face. pymust coordinates: metres, z = 0 at the chord of the array."""

    def __init__(self, probe, depth, s, rng):
        self.probe = probe
        self.kind = PROBES[probe]["kind"]
        self.param = probe_param(probe)
        self.depth = depth
        self.s = s
        p = self.param
        if self.kind == "linear":
            self.R = None
            aperture = (p.Nelements - 1) * p.pitch * 1e3
            self.W = 2 * int(round(aperture / s / 2))  # even: integral reference column
            self.H = int(round(depth / s))
            self.ref = (self.W / 2.0, 0.0)
            self.half_angle = None
            self.zoff = 0.0
        else:
            self.R = p.radius * 1e3
            _, _, _, h = p.getElementPositions()
            self.h = float(h.ravel()[0]) * 1e3
            self.zoff = self.R - self.h  # pymust z of the face centre, mm
            self.half_angle = math.radians(rng.uniform(20.0, 27.0))
            R, D, a = self.R, depth, self.half_angle
            top = R * (1 - math.cos(a))
            self.H = int(math.ceil((D + top) / s)) + 2
            self.W = 2 * int(math.ceil((R + D) * math.sin(a) / s)) + 2
            self.ref = (self.W / 2.0, float(round(top / s + 1.0)))  # integral reference pixel
        self.cols = np.arange(self.W)
        self.rows = np.arange(self.H)

    # pixel <-> Cartesian
    def px_to_xz(self, c, r):
        return (np.asarray(c, float) - self.ref[0]) * self.s, (np.asarray(r, float) - self.ref[1]) * self.s

    def xz_to_px(self, x, z):
        return np.asarray(x, float) / self.s + self.ref[0], np.asarray(z, float) / self.s + self.ref[1]

    # Cartesian <-> beam
    def xz_to_ud(self, x, z):
        if self.kind == "linear":
            return np.asarray(x, float), np.asarray(z, float)
        zz = np.asarray(z, float) + self.R
        r = np.hypot(x, zz)
        th = np.arctan2(x, zz)
        return self.R * th, r - self.R

    def ud_to_xz(self, u, d):
        if self.kind == "linear":
            return np.asarray(u, float), np.asarray(d, float)
        th = np.asarray(u, float) / self.R
        r = np.asarray(d, float) + self.R
        return r * np.sin(th), r * np.cos(th) - self.R

    def beam_angle(self, x, z):
        if self.kind == "linear":
            return np.zeros_like(np.asarray(x, float))
        return np.arctan2(x, np.asarray(z, float) + self.R)

    def inside(self, x, z):
        """Inside the imaging region (fan for the convex array)."""
        if self.kind == "linear":
            c, r = self.xz_to_px(x, z)
            return (c >= -0.5) & (c <= self.W - 0.5) & (r >= -0.5) & (r <= self.H - 0.5)
        u, d = self.xz_to_ud(x, z)
        return (d >= 0) & (d <= self.depth) & (np.abs(u / self.R) <= self.half_angle)

    def u_range(self):
        if self.kind == "linear":
            return -self.W * self.s / 2, self.W * self.s / 2
        return -self.R * self.half_angle, self.R * self.half_angle

    def to_pymust(self, x, z):
        return np.asarray(x) * 1e-3, (np.asarray(z) + self.zoff) * 1e-3

    def pixel_grid(self):
        C, Rr = np.meshgrid(self.cols, self.rows)
        X, Z = self.px_to_xz(C, Rr)
        return X, Z

    def region(self):
        if self.kind == "linear":
            return dict(x0=0, y0=0, x1=self.W, y1=self.H)
        X, Z = self.pixel_grid()
        m = self.inside(X, Z)
        ys, xs = np.nonzero(m)
        return dict(x0=int(xs.min()), y0=int(ys.min()), x1=int(xs.max()) + 1, y1=int(ys.max()) + 1)


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------

class BonePiece:
    """Bone surface z = f(x) (Cartesian, mm below the face centre) over [x0, x1]. `end` = 'right'
    when the piece ends at a joint gap on its right (x1), 'left' when it starts at one (x0); the
    surface then dives towards the gap over `end_radius` mm, as the own phantom models it."""

    def __init__(self, x0, x1, base, slope=0.0, dome=None, wave=(0.0, 30.0, 0.0), end=None,
                 end_radius=3.0, cartilage=0.0):
        self.x0, self.x1 = x0, x1
        self.base, self.slope, self.dome, self.wave = base, slope, dome, wave
        self.end, self.end_radius, self.cartilage = end, end_radius, cartilage

    def f(self, x):
        x = np.asarray(x, float)
        amp, period, phase = self.wave
        z = self.base + self.slope * x + amp * np.sin(2 * np.pi * x / period + phase)
        if self.dome is not None:  # (centre x, radius): a convex-up circular head
            xc, rad = self.dome
            dx = np.clip(x - xc, -0.95 * rad, 0.95 * rad)
            z = z + rad - np.sqrt(rad * rad - dx * dx)
        if self.end == "right":
            t = np.maximum(x - (self.x1 - self.end_radius), 0.0)
            z = z + t * t / self.end_radius * 0.8
        elif self.end == "left":
            t = np.maximum((self.x0 + self.end_radius) - x, 0.0)
            z = z + t * t / self.end_radius * 0.8
        return z

    def covers(self, x):
        x = np.asarray(x, float)
        return (x >= self.x0) & (x <= self.x1)


class Anatomy:
    def __init__(self, geo):
        self.geo = geo
        self.site = None
        self.scene = None
        self.view = "long"
        self.skin = 2.0
        self.fat = 4.0
        self.septa = []          # (d0, slope, thickness) in beam depth
        self.fascia = []         # (d0, slope, thickness) bright lines in beam depth
        self.pennation = math.radians(15)
        self.stria_period = 1.2
        self.stria_gain = 1.0
        self.muscle_bottom = None
        self.tendon = None       # dict(zc, tilt, thick, x0, x1, period, phase, n)
        self.tendon_ovals = []   # transverse tendons (xc, zc, a, b)
        self.deep_fill = "muscle"  # below the tendon: 'muscle' or 'fatpad'
        self.bones = []
        self.gap = None          # (g0, g1)
        self.recess = 0.0
        self.effusion = None     # dict(x0, x1, height, floor: 'bone'|'tendon')
        self.vessels = []        # dict(xc, zc, a, b, kind)
        self.nerves = []         # dict(xc, zc, a, b, fascicles=[(x, z, r)])
        self.retinaculum = None  # (zc, thickness) bright band (carpal tunnel)
        self.sizes = {}          # literature-driven sizes, for the json
        self.cites = set()
        # artefacts
        self.bone_db = 32.0
        self.shadow_db = 24.0
        self.reverb = (0.8, 0.4, 3)
        self.comets = []
        self.clutter_db = -26.0
        self.bd_table = None

    # ---- tendon (long axis band) ----
    def tendon_top(self, x):
        """Top of the tendon band: in beam coordinates (x = u, depth along the beam) when
        tendon['frame'] == 'beam' (convex: the band runs parallel to the curved face, as a
        sonographer aligns it), else Cartesian depth at lateral x."""
        t = self.tendon
        z = t["zc"] + math.tan(t["tilt"]) * np.asarray(x, float)
        if t.get("follow") is not None:
            b = self.bones[t["follow"]]
            z = np.asarray(b.f(x), float) - b.cartilage - t["follow_gap"] - t["thick"]
        return z

    def tendon_slope_angle(self, x):
        t = self.tendon
        if t.get("follow") is not None:
            b = self.bones[t["follow"]]
            dx = 0.05
            return np.arctan((b.f(np.asarray(x) + dx) - b.f(np.asarray(x) - dx)) / (2 * dx))
        return np.full(np.shape(x), t["tilt"], float)

    def tendon_covers(self, x):
        t = self.tendon
        x = np.asarray(x, float)
        return (x >= t["x0"]) & (x <= t["x1"])

    # ---- bone, per ray ----
    def build_bd_table(self):
        """Distance along each beam to the first bone surface (inf where the beam misses)."""
        g = self.geo
        u0, u1 = g.u_range()
        self.bd_u = np.arange(u0 - 2.0, u1 + 2.0, 0.02)
        bd = np.full(self.bd_u.shape, np.inf)
        piece = np.full(self.bd_u.shape, -1)
        if self.bones:
            dd = np.arange(0.0, g.depth + 2.0, 0.01)
            for i0 in range(0, len(self.bd_u), 200):
                uu = self.bd_u[i0:i0 + 200]
                U, Dd = np.meshgrid(uu, dd, indexing="ij")
                X, Z = g.ud_to_xz(U, Dd)
                inb = np.zeros(U.shape, bool)
                which = np.full(U.shape, -1)
                for k, b in enumerate(self.bones):
                    m = b.covers(X) & (Z >= b.f(X))
                    which[m & ~inb] = k
                    inb |= m
                first = np.where(inb.any(axis=1), inb.argmax(axis=1), -1)
                ok = first >= 0
                bd[i0:i0 + 200][ok] = dd[first[ok]]
                piece[i0:i0 + 200][ok] = which[np.nonzero(ok)[0], first[ok]]
        self.bd_table = bd
        self.bd_piece = piece

    def bone_depth_ray(self, u):
        return np.interp(u, self.bd_u, self.bd_table, left=np.inf, right=np.inf)

    # ---- fluid ----
    def effusion_floor(self, x):
        e = self.effusion
        x = np.asarray(x, float)
        if e["floor"] == "tendon":
            return self.tendon_top(x)
        if self.gap is not None:
            g0, g1 = self.gap
            left = self.bones[0].f(g0)
            right = self.bones[1].f(g1)
            in_gap = (x >= g0) & (x <= g1)
            zb = np.where(x < g0, self.bones[0].f(x) - self.bones[0].cartilage,
                          self.bones[1].f(x) - self.bones[1].cartilage)
            return np.where(in_gap, min(left, right) - self.joint_cart(), zb)
        b = self.bones[0]
        return b.f(x) - b.cartilage

    def joint_cart(self):
        return max(self.bones[0].cartilage, self.bones[1].cartilage)

    def joint_top(self):
        g0, g1 = self.gap
        return min(self.bones[0].f(g0), self.bones[1].f(g1)) - self.joint_cart()

    def effusion_top(self, x):
        e = self.effusion
        x = np.asarray(x, float)
        t = np.clip((x - e["x0"]) / (e["x1"] - e["x0"]), 0.0, 1.0)
        return self.effusion_floor(x) - e["height"] * np.sqrt(np.sin(np.pi * t))

    # ---- evaluation ----
    def evaluate(self, X, Z, want_echo=True):
        """Backscatter power (rel. muscle), attenuation (dB/cm/MHz), label at Cartesian points."""
        g = self.geo
        X = np.asarray(X, float)
        Z = np.asarray(Z, float)
        U, Dd = g.xz_to_ud(X, Z)
        shape = X.shape
        label = np.zeros(shape, np.uint8)
        echo = np.full(shape, ECHO["MUSCLE"])
        att = np.full(shape, ATT["MUSCLE"])
        done = np.zeros(shape, bool)

        def put(mask, lab, e, a):
            m = mask & ~done
            label[m] = lab
            echo[m] = e if np.isscalar(e) else e[m]
            att[m] = a if np.isscalar(a) else a[m]
            done[m] = True

        # vessels: lumen + 0.15 mm wall (label), echogenic wall out to +0.35 mm (image)
        for v in self.vessels:
            q = np.hypot((X - v["xc"]) / v["a"], (Z - v["zc"]) / v["b"])
            rr = np.hypot(X - v["xc"], Z - v["zc"])
            scale = np.where(rr > 0, rr / np.maximum(q, 1e-9), v["a"])
            out = rr - scale  # approx. distance outside the lumen, mm
            put(q < 1.0, LAB["vessel"], ECHO["BLOOD"], ATT["BLOOD"])
            put((out < VESSEL_WALL_MM), LAB["vessel"], ECHO["VESSEL_WALL"], ATT["MUSCLE"])
            put((out < 0.35), LAB["background"], ECHO["VESSEL_WALL"], ATT["MUSCLE"])
        # nerves: honeycomb
        for nv in self.nerves:
            q = np.hypot((X - nv["xc"]) / nv["a"], (Z - nv["zc"]) / nv["b"])
            inside = q < 1.0
            if inside.any():
                e = np.full(shape, ECHO["EPINEURIUM"])
                for (fx, fz, fr) in nv["fascicles"]:
                    e[np.hypot(X - fx, Z - fz) < fr] = ECHO["FASCICLE"]
                e[(q > 0.9) & inside] = ECHO["EPINEURIUM"] * 1.5
                put(inside, LAB["nerve"], e, ATT["NERVE"])
        # bone band and shadow, along the beam
        if self.bones:
            bd = self.bone_depth_ray(U)
            band = (Dd >= bd - BONE_BAND_ABOVE) & (Dd < bd + BONE_BAND_BELOW)
            put(band & (Dd < bd), LAB["bone"], ECHO["CARTILAGE"], ATT["CARTILAGE"])
            put(band, LAB["bone"], ECHO["MARROW"] * 0.2, ATT["MUSCLE"])
            put(Dd >= bd + BONE_BAND_BELOW, LAB["shadow"], ECHO["MARROW"], ATT["MUSCLE"])
        # joint recess between the bone ends
        if self.gap is not None:
            g0, g1 = self.gap
            top = self.joint_top()
            inx = (X >= g0) & (X <= g1)
            floor = top + self.joint_cart() + self.recess
            put(inx & (Z >= top) & (Z < floor), LAB["joint"], ECHO["FLUID"] * 4.0, ATT["FLUID"])
            # below the recess floor: capsule / meniscus / deeper articular structures (dense,
            # attenuating; no bright 'enhancement column' under the gap)
            put(inx & (Z >= floor), LAB["background"], ECHO["MUSCLE"] * 0.6, ATT["TENDON"] * 3.0)
        # effusion / bursa
        if self.effusion is not None:
            e = self.effusion
            inx = (X > e["x0"]) & (X < e["x1"])
            if inx.any():
                top = self.effusion_top(X)
                floor = self.effusion_floor(X)
                put(inx & (Z >= top) & (Z < floor), LAB["joint"], ECHO["FLUID"], ATT["FLUID"])
        # cartilage over the bone (vertical, Cartesian)
        for b in self.bones:
            if b.cartilage > 0:
                zb = b.f(X)
                put(b.covers(X) & (Z >= zb - b.cartilage) & (Z < zb), LAB["background"],
                    ECHO["CARTILAGE"], ATT["CARTILAGE"])
        # tendons
        beam = g.beam_angle(X, Z)
        if self.tendon is not None:
            t = self.tendon
            if t.get("frame") == "beam":
                TX, TZ, tb = U, Dd, 0.0
            else:
                TX, TZ, tb = X, Z, beam
            top = self.tendon_top(TX)
            m = self.tendon_covers(TX) & (TZ >= top) & (TZ < top + t["thick"])
            if m.any():
                a = self.tendon_slope_angle(TX)
                across = (TZ - top) * np.cos(a)
                fib = 0.15 + 1.85 * (0.5 + 0.5 * np.cos(2 * np.pi * across / t["period"] + t["phase"])) ** 2
                fib = fib * (0.75 + 0.25 * np.sin(2 * np.pi * TX / t["break_period"] + t["phase"] * 3) ** 2)
                tilt = np.abs(a + tb)
                aniso = np.maximum(np.abs(np.cos(np.minimum(tilt, np.pi / 2))) ** t["n"], 0.02)
                put(m, LAB["tendon"], ECHO["TENDON"] * fib * aniso, ATT["TENDON"])
        for (xc, zc, a_, b_) in self.tendon_ovals:
            q = np.hypot((X - xc) / a_, (Z - zc) / b_)
            m = q < 1.0
            if m.any():
                # transverse tendon: bright fibre dots
                dots = 0.4 + 1.2 * (0.5 + 0.5 * np.sin(7.0 * X + 11.0 * Z) * np.sin(9.0 * X - 5.0 * Z)) ** 2
                put(m, LAB["tendon"], ECHO["TENDON"] * 0.6 * dots, ATT["TENDON"])
        if self.retinaculum is not None:
            zr, tr = self.retinaculum
            put((Z >= zr) & (Z < zr + tr), LAB["background"], ECHO["FASCIA"], ATT["TENDON"])
        # deep fill under the tendon (fat pad)
        if self.deep_fill == "fatpad" and self.tendon is not None:
            if self.tendon.get("frame") == "beam":
                below = Dd > self.tendon_top(U) + self.tendon["thick"] + 0.3
            else:
                below = Z > self.tendon_top(X) + self.tendon["thick"] + 0.3
            sept = 1.0 + 4.0 * (np.sin(2 * np.pi * (Z * 0.7 + X * 0.3) / 2.3 + 1.0) > 0.93)
            put(below, LAB["background"], ECHO["FATPAD"] * sept, ATT["FAT"])
        # superficial layers along the beam
        put(Dd < self.skin, LAB["background"], ECHO["SKIN"], ATT["SKIN"])
        fat_bottom = self.skin + self.fat
        sep = np.zeros(shape, bool)
        for (d0, sl, th) in self.septa:
            sep |= np.abs(Dd - (d0 + sl * U)) < th / 2
        put((Dd < fat_bottom) & sep, LAB["background"], ECHO["SEPTUM"], ATT["FAT"])
        put(Dd < fat_bottom, LAB["background"], ECHO["FAT"], ATT["FAT"])
        fas = np.zeros(shape, bool)
        for (d0, sl, th) in self.fascia:
            fas |= np.abs(Dd - (d0 + sl * U)) < th / 2
        put(fas, LAB["background"], ECHO["FASCIA"], ATT["MUSCLE"])
        # muscle with perimysium striations (pennate)
        q = Dd * math.cos(self.pennation) - U * math.sin(self.pennation)
        stria = 0.7 + self.stria_gain * np.maximum(np.sin(2 * np.pi * q / self.stria_period), 0.0) ** 4
        put(np.ones(shape, bool), LAB["background"], ECHO["MUSCLE"] * stria, ATT["MUSCLE"])
        return echo, att, label


# --------------------------------------------------------------------------------------------
# Scene construction (sites)
# --------------------------------------------------------------------------------------------

SITES = {
    # name: probes, scene kinds, summary
    "knee_suprapatellar": dict(probes=("L11-5v", "C5-2v"), scenes=("bone",)),
    "knee_trochlea": dict(probes=("L11-5v", "C5-2v"), scenes=("bone",)),
    "knee_medial_joint": dict(probes=("L11-5v",), scenes=("joint",)),
    "ankle_anterior": dict(probes=("L11-5v", "L22-14v"), scenes=("joint",)),
    "achilles": dict(probes=("L11-5v",), scenes=("bone",)),
    "elbow_lateral": dict(probes=("L11-5v", "L22-14v"), scenes=("bone",)),
    "shoulder_supraspinatus": dict(probes=("L11-5v", "C5-2v"), scenes=("bone",)),
    "shoulder_posterior": dict(probes=("C5-2v",), scenes=("joint",)),
    "hip_anterior": dict(probes=("C5-2v",), scenes=("joint",)),
    "mcp_dorsal": dict(probes=("L22-14v",), scenes=("joint",)),
    "wrist_dorsal": dict(probes=("L22-14v", "L11-5v"), scenes=("joint",)),
    "forearm_volar": dict(probes=("L11-5v", "L22-14v"), scenes=("soft_tissue",)),
    "thigh_femoral": dict(probes=("C5-2v", "L11-5v"), scenes=("soft_tissue",)),
    "popliteal": dict(probes=("L11-5v", "C5-2v"), scenes=("soft_tissue",)),
    "median_wrist": dict(probes=("L22-14v", "L11-5v"), scenes=("nerve",)),
    "ulnar_wrist": dict(probes=("L22-14v",), scenes=("nerve",)),
    "tibial_ankle": dict(probes=("L11-5v",), scenes=("nerve",)),
    "sural": dict(probes=("L22-14v",), scenes=("nerve",)),
}


# `--effusion always`: every bone scene has its effusion or bursa (preset scenes whose target
# is the fluid).
FORCE_EFFUSION = False


def _u(rng, lo, hi):
    return float(rng.uniform(lo, hi))


def build_anatomy(geo, site, rng):
    a = Anatomy(geo)
    a.site = site
    a.scene = SITES[site]["scenes"][0]
    D = geo.depth
    u0, u1 = geo.u_range()
    Wd = u1 - u0  # field width on the face, mm
    conv = geo.kind == "convex"
    small = geo.probe == "L22-14v"
    # --- superficial layers [laurent2007]: skin 1.5-3 mm; thinner on the hand/foot dorsum ---
    a.skin = _u(rng, 1.0, 1.8) if small else _u(rng, 1.5, 3.0)
    a.cites |= {"laurent2007", "jacobson2018", "szabo2014", "feldman2009", "garcia2022",
                "perrot2021"}
    fat_rng = {"hip_anterior": (6, 20), "thigh_femoral": (5, 18), "popliteal": (3, 10),
               "knee_suprapatellar": (3, 10) if not conv else (8, 18),
               "knee_trochlea": (3, 9) if not conv else (8, 18),
               "shoulder_supraspinatus": (2, 6) if not conv else (6, 14),
               "shoulder_posterior": (6, 14)}.get(site, (1.0, 3.0) if small else (2.0, 6.0))
    a.fat = _u(rng, *fat_rng)
    fat_bottom = a.skin + a.fat
    a.septa = [(_u(rng, a.skin + 0.4, fat_bottom - 0.2), _u(rng, -0.1, 0.1), _u(rng, 0.1, 0.25))
               for _ in range(int(rng.integers(1, 5)))]
    a.fascia = [(fat_bottom + 0.1, _u(rng, -0.02, 0.02), _u(rng, 0.2, 0.45))]
    a.pennation = math.radians(_u(rng, 5.0, 25.0))  # [kawakami1998]
    a.cites.add("kawakami1998")
    a.stria_period = _u(rng, 1.0, 3.0) * (0.6 if small else 1.0)
    a.stria_gain = _u(rng, 1.5, 3.5)
    # --- artefact levels ---
    a.bone_db = _u(rng, 22.0, 30.0)      # specular cortex above muscle speckle
    a.shadow_db = _u(rng, 16.0, 30.0)    # two-way transmission loss into bone (partial shadow)
    a.reverb = (_u(rng, 0.4, 1.2) * (0.5 if small else 1.0), _u(rng, 0.05, 0.15), int(rng.integers(1, 5)))
    a.clutter_db = _u(rng, -32.0, -22.0)
    a.n_aniso = _u(rng, 60.0, 150.0)    # cos^n power law [crass1988]
    a.cites.add("crass1988")
    # tendon tilt 0-15 deg, mostly small (sonographers align the probe with the fibres)
    tilt = math.radians(15.0 * rng.uniform() ** 3) * (1 if rng.uniform() < 0.5 else -1)
    fib = dict(period=_u(rng, 0.25, 0.5) * (0.6 if small else 1.0), phase=_u(rng, 0, 2 * np.pi),
               break_period=_u(rng, 3.0, 8.0), n=a.n_aniso)

    def tendon_band(zc, thick, x0=None, x1=None, follow=None, follow_gap=0.0):
        a.tendon = dict(zc=zc, tilt=tilt if follow is None else 0.0, thick=thick,
                        x0=u0 - 5 if x0 is None else x0, x1=u1 + 5 if x1 is None else x1,
                        follow=follow, follow_gap=follow_gap,
                        frame="beam" if (conv and follow is None) else "cartesian", **fib)
        a.sizes["tendon_thickness_mm"] = round(thick, 2)
        a.sizes["tendon_tilt_deg"] = round(math.degrees(a.tendon["tilt"]), 1)

    def max_tendon_bottom(xs):
        if a.tendon.get("frame") == "beam":
            us = np.linspace(u0, u1, 101)
            return float(np.max(a.tendon_top(us) + a.tendon["thick"]))
        return float(np.max(a.tendon_top(xs) + a.tendon["thick"]))

    xs = np.linspace(u0, u1, 101)
    if conv:  # the lateral extent at depth grows with the fan; use the Cartesian span
        xs = np.linspace(-(geo.R + D) * math.sin(geo.half_angle), (geo.R + D) * math.sin(geo.half_angle), 201)
    m1 = 0.0  # muscle between fat and tendon
    # a steep tendon must not use up the depth: its depth change across the field <= D/4
    xmax = float(np.max(np.abs(xs))) if not conv else (u1 - u0) / 2
    if 2 * abs(math.tan(tilt)) * xmax > 0.25 * D:
        tilt = math.copysign(math.atan(0.25 * D / (2 * xmax)), tilt)
    tilt_drop = 2 * abs(math.tan(tilt)) * xmax

    def fit(needed_below):
        """Thin the superficial muscle, then the fat (to half its literature minimum), so that
        the layers plus `needed_below` fit in 85 % of the depth."""
        nonlocal m1, fat_bottom
        excess = fat_bottom + m1 + needed_below - 0.85 * D
        if excess <= 0:
            return
        cut = min(excess, max(m1 - 0.3, 0.0))
        m1 -= cut
        excess -= cut
        if excess > 0:
            a.fat = max(0.5 * fat_rng[0], a.fat - excess)
            fat_bottom = a.skin + a.fat
            a.septa = [q for q in a.septa if q[0] < fat_bottom - 0.2]
            a.fascia[0] = (fat_bottom + 0.1, a.fascia[0][1], a.fascia[0][2])

    def place_vessel(kind, diam, aspect, zlo, zhi, xlo=None, xhi=None, avoid=()):
        r = diam / 2.0
        b = r * aspect
        xlo = u0 * 0.75 if xlo is None else xlo
        xhi = u1 * 0.75 if xhi is None else xhi
        if zhi - zlo < 2 * b + 0.5:
            return None
        for _ in range(40):
            xc = _u(rng, xlo, xhi)
            zc = _u(rng, zlo + b + 0.3, zhi - b - 0.3)
            if all(abs(xc - ax) > aw + r + 0.5 for (ax, aw) in avoid):
                v = dict(xc=xc, zc=zc, a=r, b=b, kind=kind)
                a.vessels.append(v)
                return v
        return None

    scene_kind = a.scene
    # a small artery/vein between the tendon and the bone in half of the bone/joint scenes
    want_vessel = scene_kind in ("bone", "joint") and rng.uniform() < 0.5
    v_diam = _u(rng, 1.5, 3.0) * (0.6 if small else 1.0)
    vessel_room = v_diam + 2.0 if want_vessel else 0.0
    if site in ("knee_suprapatellar", "knee_trochlea", "achilles", "elbow_lateral",
                "shoulder_supraspinatus"):
        # ---- single bone with an overlying tendon; effusion/bursa half the time ----
        if site == "knee_suprapatellar":
            thick = _u(rng, 5.0, 8.0)  # quadriceps tendon [jacobson2018]
            cart = 0.0
            eff_h = _u(rng, 2.0, 10.0)  # suprapatellar effusion depth [jacobson2018, wakefield2005]
            eff_floor = "bone"
            a.deep_fill = "fatpad"      # suprapatellar / prefemoral fat
            dome = None
            p_eff = 0.6
            a.cites |= {"wakefield2005"}
        elif site == "knee_trochlea":
            thick = _u(rng, 5.0, 8.0)
            cart = _u(rng, 1.5, 3.0)  # femoral trochlear cartilage [schmitz2017]
            eff_h = _u(rng, 2.0, 6.0)
            eff_floor = "bone"
            a.deep_fill = "fatpad"
            dome = ("trochlea",)
            p_eff = 0.3
            a.cites |= {"schmitz2017", "wakefield2005"}
        elif site == "achilles":
            thick = _u(rng, 4.0, 7.0)  # [koivunen1995, fornage1986]
            cart = _u(rng, 0.3, 0.8)   # calcaneal fibrocartilage
            eff_h = _u(rng, 1.5, 4.0)  # distended retrocalcaneal bursa [jacobson2018]
            eff_floor = "bone"
            a.deep_fill = "fatpad"      # Kager's fat pad
            dome = None
            p_eff = 0.5
            a.cites |= {"koivunen1995", "fornage1986"}
        elif site == "elbow_lateral":
            thick = _u(rng, 3.0, 5.0)  # common extensor origin, about 4 mm [jacobson2018]
            cart = 0.0                 # the lateral epicondyle carries no cartilage
            eff_h = _u(rng, 1.5, 3.0)  # a little fluid beside the origin, rarely
            eff_floor = "bone"
            a.deep_fill = "muscle"
            dome = None
            p_eff = 0.2
        else:  # shoulder_supraspinatus
            thick = _u(rng, 4.0, 8.0)  # [cholewinski2008]
            cart = _u(rng, 0.8, 1.5)   # humeral head cartilage [jacobson2018]
            eff_h = _u(rng, 2.0, 4.0)  # distended subacromial-subdeltoid bursa (> 2 mm) [vanholsbeeck1993]
            eff_floor = "tendon"
            a.deep_fill = "muscle"
            dome = ("head",)
            p_eff = 0.5
            a.cites |= {"cholewinski2008", "vanholsbeeck1993"}
        a.sizes["cartilage_mm"] = round(cart, 2)
        m1 = _u(rng, 0.0, 3.0) if site != "shoulder_supraspinatus" else _u(rng, 3.0, 10.0) * (0.6 if not conv else 1.0)
        has_eff = rng.uniform() < p_eff or FORCE_EFFUSION
        gapmm = _u(rng, 1.0, 6.0) + (eff_h if has_eff else 0.0) + vessel_room
        if site == "shoulder_supraspinatus":
            fit((eff_h + 0.5 if has_eff else 0.0) + thick + 0.2 + cart + 4.0)
        else:
            fit(tilt_drop + thick + gapmm + cart + 5.0)
        if site == "shoulder_supraspinatus":
            # tendon follows the humeral head (curved -> anisotropic at the slopes)
            top_t = fat_bottom + m1 + (eff_h + 0.5 if has_eff else 0.0)
            rad = _u(rng, 20.0, 27.0)  # humeral head radius of curvature [jacobson2018]
            xc = _u(rng, -0.25, 0.25) * Wd
            base = top_t + thick + 0.2 + cart
            b = BonePiece(u0 - 60, u1 + 60, base, dome=(xc, rad), cartilage=cart,
                          wave=(_u(rng, 0.05, 0.25), _u(rng, 8, 20), _u(rng, 0, 6.3)))
            a.bones = [b]
            tendon_band(0.0, thick, x0=xc - rad * 0.8, x1=u1 + 5, follow=0, follow_gap=0.2)
            if has_eff:
                c0 = _u(rng, -0.15, 0.15) * Wd
                w = _u(rng, 0.3, 0.5) * Wd
                a.effusion = dict(x0=c0 - w / 2, x1=c0 + w / 2, height=eff_h, floor="tendon")
        else:
            top_t = fat_bottom + m1
            tendon_band(top_t, thick)
            # shift the band down so that its shallowest point is at top_t
            a.tendon["zc"] = top_t + abs(math.tan(tilt)) * (xs.max())
            below = max_tendon_bottom(xs)
            base = below + gapmm + cart
            if dome and dome[0] == "trochlea":
                # trochlear groove: two facets meeting at a shallow V (inverted dome)
                xc = _u(rng, -0.2, 0.2) * Wd
                b = BonePiece(u0 - 60, u1 + 60, base + 3.0, cartilage=cart,
                              wave=(_u(rng, 0.05, 0.3), _u(rng, 10, 25), _u(rng, 0, 6.3)))
                rad = _u(rng, 18.0, 30.0)
                b.dome = None
                b.slope = 0.0
                b._trochlea = (xc, rad)
                f0 = b.f

                def f_troch(x, f0=f0, xc=xc, rad=rad):
                    dx = np.clip(np.asarray(x, float) - xc, -0.95 * rad, 0.95 * rad)
                    return f0(x) - (rad - np.sqrt(rad * rad - dx * dx)) * 0.6
                b.f = f_troch
            else:
                slope = _u(rng, -0.08, 0.08)
                b = BonePiece(u0 - 60, u1 + 60, base, slope=slope, cartilage=cart,
                              wave=(_u(rng, 0.1, 0.6), _u(rng, 15, 40), _u(rng, 0, 6.3)))
                if site in ("achilles", "elbow_lateral") and rng.uniform() < 0.7:
                    # calcaneus occupies one side of the field only (its posterior tuberosity)
                    edge = _u(rng, -0.3, 0.1) * Wd
                    if rng.uniform() < 0.5:
                        b.x0 = edge
                        b.end = "left"
                    else:
                        b.x1 = -edge
                        b.end = "right"
                    b.end_radius = _u(rng, 3.0, 6.0)
            a.bones = [b]
            if has_eff:
                lo = max(b.x0, u0) + 2
                hi = min(b.x1, u1) - 2
                w = min(_u(rng, 0.3, 0.6) * Wd, hi - lo)
                c0 = _u(rng, lo + w / 2, hi - w / 2) if hi - lo > w else 0.5 * (lo + hi)
                a.effusion = dict(x0=c0 - w / 2, x1=c0 + w / 2, height=eff_h, floor="bone")
        a.sizes["effusion_height_mm"] = round(eff_h, 2) if a.effusion else None
    elif scene_kind == "joint":
        # ---- two bone ends with a fluid-filled recess, tendon/ligament over it ----
        params = {
            # site: tendon thickness, cartilage, gap width, recess depth, effusion height
            "knee_medial_joint": ((2.0, 4.0), (1.5, 3.0), (4.0, 8.0), (1.5, 3.0), (1.5, 4.0)),
            "ankle_anterior": ((3.0, 5.0), (1.0, 2.0), (3.0, 7.0), (1.5, 3.5), (2.0, 5.0)),
            "shoulder_posterior": ((4.0, 7.0), (1.0, 2.0), (5.0, 10.0), (2.0, 4.0), (2.0, 5.0)),
            "hip_anterior": ((5.0, 9.0), (1.5, 3.0), (6.0, 12.0), (2.0, 5.0), (3.0, 9.0)),
            "mcp_dorsal": ((0.8, 1.6), (0.4, 0.9), (1.5, 3.0), (0.8, 1.8), (1.0, 3.0)),
            "wrist_dorsal": ((1.5, 3.0), (0.6, 1.2), (2.0, 4.0), (1.0, 2.5), (1.0, 3.0)),
        }[site]
        thick = _u(rng, *params[0])
        cart = _u(rng, *params[1])
        gap_w = _u(rng, *params[2])
        a.recess = _u(rng, *params[3])
        eff_h = _u(rng, *params[4])
        cite_map = {"knee_medial_joint": {"schmitz2017"}, "ankle_anterior": {"nazarian1995"},
                    "hip_anterior": {"koski1989"}, "mcp_dorsal": {"szkudlarek2003"},
                    "wrist_dorsal": {"szkudlarek2003"}, "shoulder_posterior": set()}
        a.cites |= cite_map[site] | {"wakefield2005"}
        m1 = {"hip_anterior": _u(rng, 8.0, 20.0), "shoulder_posterior": _u(rng, 6.0, 15.0)}.get(site, _u(rng, 0.0, 2.0))
        er = _u(rng, 2.5, 4.5) * (0.4 if small else 1.0)
        spacer = _u(rng, 1.0, 3.0)
        fit(tilt_drop + thick + spacer + eff_h + cart + vessel_room + 1.0 + 0.8 * er + a.recess + 3.0)
        top_t = fat_bottom + m1
        tendon_band(top_t, thick)
        a.tendon["zc"] = top_t + abs(math.tan(tilt)) * xs.max()
        below = max_tendon_bottom(xs)
        base = below + spacer + eff_h + cart + vessel_room
        gc = _u(rng, -0.15, 0.15) * Wd
        g0, g1 = gc - gap_w / 2, gc + gap_w / 2
        wav = (_u(rng, 0.1, 0.5) * (0.4 if small else 1.0), _u(rng, 20, 50), _u(rng, 0, 6.3))
        left = BonePiece(u0 - 60, g0, base + _u(rng, -1.0, 1.0), end="right", end_radius=er,
                         cartilage=cart, wave=wav)
        right = BonePiece(g1, u1 + 60, base + _u(rng, -1.0, 1.0), end="left", end_radius=er,
                          cartilage=cart, wave=wav)
        if site in ("hip_anterior", "shoulder_posterior", "mcp_dorsal", "ankle_anterior") and rng.uniform() < 0.7:
            # the convex articular head on one side (femoral/humeral/metacarpal head, talar dome)
            rad = {"hip_anterior": (20, 27), "shoulder_posterior": (20, 27), "mcp_dorsal": (5, 8),
                   "ankle_anterior": (15, 22)}[site]
            rad = _u(rng, *rad)
            right.dome = (g1 + rad * 0.6, rad)
            right.base -= rad - math.sqrt(rad * rad - (rad * 0.6) ** 2)
        a.bones = [left, right]
        a.gap = (g0, g1)
        e0 = g0 - _u(rng, 1.5, 3.0) * (0.5 if small else 1.0)
        e1 = g1 + _u(rng, 1.5, 3.0) * (0.5 if small else 1.0)
        a.effusion = dict(x0=e0, x1=e1, height=eff_h, floor="bone")
        a.sizes.update(cartilage_mm=round(cart, 2), gap_mm=round(gap_w, 2), recess_mm=round(a.recess, 2),
                       effusion_height_mm=round(eff_h, 2))
    elif scene_kind == "soft_tissue":
        # ---- muscles, fascia, a tendon, vessels; no bone in the field ----
        thick = _u(rng, 2.0, 4.0) if site == "forearm_volar" else _u(rng, 2.5, 5.0)
        m1 = _u(rng, 1.0, 6.0) * (0.5 if small else 1.0)
        if site == "forearm_volar":
            diam = _u(rng, 2.0, 3.0)  # radial artery [yoo2005]
            a.cites.add("yoo2005")
        elif site == "thigh_femoral":
            diam = _u(rng, 8.0, 10.0)  # common femoral artery [sandgren1999]
            a.cites.add("sandgren1999")
        else:
            diam = _u(rng, 5.0, 7.0)  # popliteal artery [wolf2006]
            a.cites.add("wolf2006")
        need = diam + 3.0
        if D - 2.0 - (fat_bottom + m1 + thick + 1.0 + 15.0 * math.tan(abs(tilt))) < need:
            # not enough depth under the tendon: thin the fat and the superficial muscle
            m1 = 0.5
            a.fat = max(fat_rng[0], min(a.fat, D - 2.0 - need - m1 - thick - a.skin - 1.5))
            fat_bottom = a.skin + a.fat
            a.septa = [q for q in a.septa if q[0] < fat_bottom - 0.2]
            a.fascia[0] = (fat_bottom + 0.1, a.fascia[0][1], a.fascia[0][2])
        top_t = fat_bottom + m1
        tendon_band(top_t, thick)
        a.tendon["zc"] = top_t + abs(math.tan(tilt)) * xs.max()
        below = max_tendon_bottom(xs)
        zlo, zhi = below + 1.0, D - 2.0
        if zhi - zlo < need - 1.0:
            # still too shallow: the tendon covers the centre only; the vessel lies beside it
            half = _u(rng, 0.15, 0.25) * Wd
            a.tendon["x0"], a.tendon["x1"] = -half, half
            zlo = fat_bottom + 0.5
            side = 1 if rng.uniform() < 0.5 else -1
            art = place_vessel("artery", diam, _u(rng, 0.9, 1.0), zlo, zhi,
                               xlo=half + diam / 2 + 1.0 if side > 0 else u0 * 0.8,
                               xhi=u1 * 0.8 if side > 0 else -half - diam / 2 - 1.0)
        else:
            art = place_vessel("artery", diam, _u(rng, 0.9, 1.0), zlo, zhi)
        # an intermuscular aponeurosis
        a.fascia.append((below + _u(rng, 2.0, 6.0), _u(rng, -0.05, 0.05), _u(rng, 0.3, 0.6)))
        if art is not None:
            vd = diam * _u(rng, 1.0, 1.6)  # accompanying vein: larger, oval (compressible)
            side = 1 if rng.uniform() < 0.5 else -1
            vx = art["xc"] + side * (diam / 2 + vd / 2 + _u(rng, 0.5, 2.0))
            asp = _u(rng, 0.35, 0.8)
            if not (u0 + vd < vx < u1 - vd):
                vx = art["xc"] - side * (diam / 2 + vd / 2 + _u(rng, 0.5, 2.0))
            tr_ = a.tendon
            clear = not (tr_["x0"] - vd / 2 < vx < tr_["x1"] + vd / 2) or art["zc"] - diam / 2 > below
            if u0 + vd < vx < u1 - vd and clear:
                vz = min(max(art["zc"] + _u(rng, -1, 1), zlo + vd * asp / 2 + 0.5), zhi - vd * asp / 2 - 0.5)
                a.vessels.append(dict(xc=vx, zc=vz, a=vd / 2, b=vd / 2 * asp, kind="vein"))
        a.sizes["artery_diameter_mm"] = round(diam, 2)
    else:  # nerve scenes: transverse view
        a.view = "trans"
        spec = {
            # CSA mm^2 [cartwright2008], companion
            "median_wrist": ((7.0, 13.0), "tendons"),
            "ulnar_wrist": ((4.5, 7.5), "artery"),
            "tibial_ankle": ((9.0, 14.0), "artery_veins"),
            "sural": ((1.5, 3.0), "vein"),
        }[site]
        a.cites |= {"cartwright2008", "silvestri1995"}
        csa = _u(rng, *spec[0])
        flat = _u(rng, 1.5, 3.0) if site == "median_wrist" else _u(rng, 1.2, 2.0)  # [buchberger1992]
        if site == "median_wrist":
            a.cites.add("buchberger1992")
        bsemi = math.sqrt(csa / math.pi / flat)
        asemi = bsemi * flat
        a.sizes.update(nerve_csa_mm2=round(csa, 2), nerve_flattening=round(flat, 2))
        depth_top = fat_bottom + _u(rng, 0.5, 3.0) * (0.5 if small else 1.0)
        if site == "median_wrist":
            a.retinaculum = (depth_top, _u(rng, 0.4, 0.8))
            depth_top += a.retinaculum[1] + 0.3
        # central tendon (target reference): transverse oval at the image centre
        tw = _u(rng, 3.0, 5.0) * (0.7 if small else 1.0)
        th = tw * _u(rng, 0.5, 0.8)
        nx = (1 if rng.uniform() < 0.5 else -1) * (tw / 2 + asemi + _u(rng, 0.5, 2.0))
        tz = depth_top + th / 2 + _u(rng, 0.0, 1.0)
        a.tendon_ovals.append((0.0, tz, tw / 2, th / 2))
        nz = depth_top + bsemi + _u(rng, 0.0, 1.5)
        # fascicles: hypoechoic dots 0.2-0.8 mm [silvestri1995]
        fasc = []
        nf = int(np.clip(csa * _u(rng, 1.0, 2.0), 4, 25))
        for _ in range(nf * 6):
            if len(fasc) >= nf:
                break
            fr = _u(rng, 0.15, 0.35) if csa >= 5 else _u(rng, 0.1, 0.2)
            rr = math.sqrt(rng.uniform()) * 0.8
            ang = rng.uniform(0, 2 * np.pi)
            fx, fz = nx + rr * asemi * math.cos(ang), nz + rr * bsemi * math.sin(ang)
            if all(math.hypot(fx - o[0], fz - o[1]) > fr + o[2] + 0.05 for o in fasc):
                fasc.append((fx, fz, fr))
        a.nerves.append(dict(xc=nx, zc=nz, a=asemi, b=bsemi, fascicles=fasc))
        a.sizes["n_fascicles"] = len(fasc)
        # more tendons around (flexor tendons in the carpal tunnel)
        if spec[1] == "tendons":
            for k in range(int(rng.integers(2, 5))):
                ox = _u(rng, u0 + 2, u1 - 2)
                oz = nz + _u(rng, 1.5, 5.0)
                ow = _u(rng, 2.5, 4.5) * (0.7 if small else 1.0)
                ok = all(math.hypot(ox - t[0], oz - t[1]) > ow / 2 + max(t[2], t[3]) + 0.3 for t in a.tendon_ovals)
                ok &= math.hypot(ox - nx, oz - nz) > ow / 2 + asemi + 0.5
                if ok and oz + ow < D - 1:
                    a.tendon_ovals.append((ox, oz, ow / 2, ow / 2 * _u(rng, 0.6, 0.9)))
        else:
            vd = {"artery": _u(rng, 2.0, 3.0), "artery_veins": _u(rng, 2.0, 3.5), "vein": _u(rng, 2.0, 4.0)}[spec[1]]
            # beside the nerve, on the far side from the central tendon; else just deep to it
            vx = nx + np.sign(nx) * (asemi + vd / 2 + _u(rng, 0.3, 1.5))
            vz = nz + _u(rng, -0.5, 0.5)
            kind = "vein" if spec[1] == "vein" else "artery"
            asp = _u(rng, 0.5, 0.8) if kind == "vein" else _u(rng, 0.9, 1.0)
            if not (u0 + vd / 2 + 1 < vx < u1 - vd / 2 - 1):
                vx = nx + np.sign(nx) * _u(rng, 0.0, asemi * 0.5)
                vz = nz + bsemi + vd * asp / 2 + _u(rng, 0.4, 1.0)
            a.vessels.append(dict(xc=vx, zc=vz, a=vd / 2, b=vd / 2 * asp, kind=kind))
            if spec[1] == "artery_veins":
                for sgn in (-1, 1):
                    wd = _u(rng, 1.2, 2.5)
                    a.vessels.append(dict(xc=vx + sgn * (vd / 2 + wd / 2 + 0.3), zc=nz + _u(rng, 0.5, 1.5),
                                          a=wd / 2, b=wd / 2 * _u(rng, 0.4, 0.7), kind="vein"))
            a.sizes["vessel_diameter_mm"] = round(vd, 2)
            a.cites.add("yoo2005")
        # deep bone (radius/carpal/tibia) in most nerve scenes
        if rng.uniform() < 0.6 and site != "sural":
            deepest = max([t[1] + t[3] for t in a.tendon_ovals] + [nz + bsemi] +
                          [v["zc"] + v["b"] for v in a.vessels])
            base = deepest + _u(rng, 1.5, 4.0)
            if base < D - 2:
                a.bones = [BonePiece(u0 - 60, u1 + 60, base, slope=_u(rng, -0.08, 0.08),
                                     wave=(_u(rng, 0.2, 0.8), _u(rng, 8, 25), _u(rng, 0, 6.3)))]
    # --- vessels in bone/joint scenes: small artery/vein, clear of the structures ---
    if want_vessel and a.tendon is not None and a.tendon.get("follow") is None:
        below = max_tendon_bottom(xs)
        zb = min(float(np.min(b.f(np.clip(xs, b.x0, b.x1)))) for b in a.bones)
        zhi = zb - 1.5 - (a.effusion["height"] if a.effusion is not None and a.effusion["floor"] == "bone" else 0) - max(b.cartilage for b in a.bones)
        busy = []
        if a.effusion is not None:
            busy.append((0.5 * (a.effusion["x0"] + a.effusion["x1"]), 0.5 * (a.effusion["x1"] - a.effusion["x0"]) + 2.0))
        if a.gap is not None:
            busy.append((0.5 * (a.gap[0] + a.gap[1]), 0.5 * (a.gap[1] - a.gap[0]) + 3.0))
        place_vessel("artery" if rng.uniform() < 0.6 else "vein", v_diam, _u(rng, 0.5, 1.0),
                     below + 0.5, zhi, avoid=busy)
    if scene_kind == "soft_tissue" and a.tendon is None:
        raise RuntimeError("soft tissue scene without tendon")
    # keep structures that must be visible inside the depth
    for b in a.bones:
        if b.base > D - 2.0:
            b.base = D - _u(rng, 3.0, 6.0)
    a.build_bd_table()
    return a


def target_of(a):
    """Ideal target as the own phantom defines it, (x, z) Cartesian mm, plus the kind and the
    tolerance (about half the target structure's smaller dimension, >= 1 mm)."""
    if a.scene == "joint" and a.gap is not None:
        g0, g1 = a.gap
        x = 0.5 * (g0 + g1)
        top = a.joint_top()
        h = a.joint_cart() + a.recess
        return "joint_space", (x, top + h / 2), max(1.0, 0.5 * min(g1 - g0, h))
    if a.effusion is not None and a.scene in ("bone", "joint", "nerve"):
        e = a.effusion
        x = 0.5 * (e["x0"] + e["x1"])
        return "effusion", (x, float(a.effusion_floor(x)) - 1.0), max(1.0, 0.5 * min(e["x1"] - e["x0"], e["height"]))
    if a.tendon is not None:
        return "peritendinous", (0.0, float(a.tendon_top(0.0)) - 0.5), 1.0
    # transverse: the central tendon oval
    xc, zc, ta, tb = a.tendon_ovals[0]
    return "peritendinous", (xc, zc - tb - 0.5), 1.0


# --------------------------------------------------------------------------------------------
# Scatterers
# --------------------------------------------------------------------------------------------

def loss_map(a, rng):
    """Two-way excess attenuation (dB, beyond pymust's uniform NOMINAL_ATT) on a beam grid,
    smoothed laterally over the beam width (partial shadows at bone edges)."""
    g = a.geo
    fmhz = g.param.fc / 1e6
    u0, u1 = g.u_range()
    du = 0.1 if g.kind == "linear" else 0.2
    uu = np.arange(u0 - 3, u1 + 3 + du, du)
    dd = np.arange(0.0, g.depth + 1.5, 0.05)
    U, Dd = np.meshgrid(uu, dd, indexing="ij")
    X, Z = g.ud_to_xz(U, Dd)
    _, att, lab = a.evaluate(X, Z)
    excess = 2.0 * (att - NOMINAL_ATT) * fmhz * 0.005  # dB per 0.05 mm step (0.005 cm)
    loss = np.cumsum(excess, axis=1)
    if a.bones:
        bd = a.bone_depth_ray(U)
        loss = loss + np.where(Dd > bd + 0.08, a.shadow_db, 0.0) + np.where(Dd > bd + 0.3, 1.0 * fmhz * 2 * (Dd - bd - 0.3) * 0.1, 0.0)
    lin = 10 ** (-loss / 20.0)
    # lateral smoothing over the beam width (FWHM ~ lambda * F#)
    lam = C_SOUND / g.param.fc * 1e3
    sig = max(lam * 1.5 / 2.355, du) / du
    from scipy.ndimage import gaussian_filter1d
    lin = gaussian_filter1d(lin, sig, axis=0, mode="nearest")
    return uu, dd, lin


def make_scatterers(a, rng, density):
    g = a.geo
    fmhz = g.param.fc / 1e6
    lam = C_SOUND / g.param.fc * 1e3
    # region to fill (Cartesian)
    if g.kind == "linear":
        x0, x1 = g.u_range()
        x0 -= 2.0
        x1 += 2.0
        area = (x1 - x0) * (g.depth + 1.0)
        n = int(density * area)
        X = rng.uniform(x0, x1, n)
        Z = rng.uniform(0.05, g.depth + 1.0, n)
    else:
        R, D, ha = g.R, g.depth, g.half_angle + math.radians(2.0)
        area = ha * ((R + D + 1) ** 2 - R ** 2)
        n = int(density * area)
        r = np.sqrt(rng.uniform(R ** 2, (R + D + 1) ** 2, n))
        th = rng.uniform(-ha, ha, n)
        X = r * np.sin(th)
        Z = r * np.cos(th) - R
        keep = Z > -R * (1 - math.cos(ha)) - 1
        X, Z = X[keep], Z[keep]
        r = np.hypot(X, Z + R)
        keep = r > R + 0.05
        X, Z = X[keep], Z[keep]
    echo, _, _ = a.evaluate(X, Z)
    uu, dd, lin = loss_map(a, rng)
    from scipy.interpolate import RegularGridInterpolator
    interp = RegularGridInterpolator((uu, dd), lin, bounds_error=False, fill_value=None)
    U, Dd = g.xz_to_ud(X, Z)
    tr = np.clip(interp(np.stack([U, Dd], axis=1)), 0, None)
    amp = np.sqrt(echo) * tr
    # importance sampling of dark scatterers (fluid, shadow): fewer, stronger (same mean power)
    dark = amp ** 2 < 0.01
    keepp = np.where(dark, 0.35, 1.0)
    keep = rng.uniform(size=amp.shape) < keepp
    amp = amp[keep] / np.sqrt(keepp[keep])
    X, Z = X[keep], Z[keep]
    RC = amp * rng.standard_normal(amp.shape)
    xs, zs, rcs = [X], [Z], [RC]
    # coherent specular bone surface and its reverberations / comet tails
    if a.bones:
        w_lat = lam * 1.5
        a_ax = C_SOUND / (2 * g.param.bandwidth / 100 * g.param.fc) * 1e3
        spacing = lam / 5
        A = 10 ** (a.bone_db / 20) * math.sqrt(density * w_lat * a_ax) / (w_lat / spacing)
        for b in a.bones:
            lo, hi = g.u_range()
            if g.kind == "convex":
                hi = (g.R + g.depth) * math.sin(g.half_angle) + 2
                lo = -hi
            bx0, bx1 = max(b.x0, lo - 2), min(b.x1, hi + 2)
            if bx1 <= bx0:
                continue
            # arc-length sampling along the surface
            xf = np.linspace(bx0, bx1, 4000)
            zf = b.f(xf)
            sl = np.concatenate([[0], np.cumsum(np.hypot(np.diff(xf), np.diff(zf)))])
            ss = np.arange(0, sl[-1], spacing)
            bxs = np.interp(ss, sl, xf)
            bzs = np.interp(ss, sl, zf) + rng.normal(0, lam / 12, ss.shape)
            # only where this surface is the first bone the beam meets (visible)
            bu, bdd = g.xz_to_ud(bxs, bzs)
            vis = np.abs(a.bone_depth_ray(bu) - bdd) < 0.3
            vis &= g.inside(bxs, np.minimum(bzs, g.depth - 0.1)) | (g.kind == "linear")
            bxs, bzs, bu, bdd = bxs[vis], bzs[vis], bu[vis], bdd[vis]
            if len(bxs) == 0:
                continue
            t_here = np.clip(interp(np.stack([bu, np.maximum(bdd - 0.1, 0)], axis=1)), 0, None)
            amp_b = A * t_here * (1 + 0.25 * rng.standard_normal(bxs.shape))
            xs.append(bxs)
            zs.append(bzs)
            rcs.append(amp_b)
            # reverberation: ghost copies along the beam below the cortex
            step, ratio, k_n = a.reverb
            ang = g.beam_angle(bxs, bzs)
            for k in range(1, k_n + 1):
                xs.append(bxs + k * step * np.sin(ang))
                zs.append(bzs + k * step * np.cos(ang))
                rcs.append(amp_b * ratio ** k * (1 + 0.3 * rng.standard_normal(bxs.shape)))
            # comet tails: short, closely spaced, decaying echo trains at a few spots
            for _ in range(int(rng.choice([0, 0, 1, 2]))):
                j = int(rng.integers(0, len(bxs)))
                seg = np.abs(np.arange(len(bxs)) - j) < max(2, int(0.4 / spacing))
                cstep = _u(rng, 0.15, 0.35)
                for k in range(1, int(rng.integers(4, 10))):
                    xs.append(bxs[seg] + k * cstep * np.sin(ang[seg]))
                    zs.append(bzs[seg] + k * cstep * np.cos(ang[seg]))
                    rcs.append(amp_b[seg] * 0.2 * 0.75 ** k)
                a.comets.append(round(float(bxs[j]), 2))
    # clutter floor: weak random scatterers everywhere, stronger near the skin (reverberation
    # between the probe and the superficial layers); not attenuated by the shadow
    nc = len(X) // 4
    if g.kind == "linear":
        cx = rng.uniform(*g.u_range(), nc)
        cz = rng.uniform(0.05, g.depth + 1, nc)
    else:
        idx = rng.integers(0, len(X), nc)
        cx = X[idx] + rng.normal(0, 0.3, nc)
        cz = Z[idx] + rng.normal(0, 0.3, nc)
    _, cd = g.xz_to_ud(cx, cz)
    # relative to the tissue level after the TGC: the TGC compensates muscle attenuation, so the
    # clutter is scaled by the muscle's excess loss over pymust's nominal attenuation
    tissue_loss_db = 2 * (ATT["MUSCLE"] - NOMINAL_ATT) * fmhz * np.maximum(cd, 0) / 10.0
    camp = 10 ** (a.clutter_db / 20) * 2.0 * (0.6 + 1.2 * np.exp(-cd / 6.0)) * 10 ** (-tissue_loss_db / 20)
    xs.append(cx)
    zs.append(cz)
    rcs.append(camp * rng.standard_normal(nc))
    return np.concatenate(xs), np.concatenate(zs), np.concatenate(rcs).astype(np.float32)


# --------------------------------------------------------------------------------------------
# pymust SIMUS for several transmits in one pass
# --------------------------------------------------------------------------------------------

_EPS = np.finfo(np.float32).eps


def _sinc(x):
    return np.sin(np.abs(x) + _EPS) / (np.abs(x) + _EPS)


def _segmean(E, M):
    if M == 1:
        return E[:, :, 0]
    acc = E[:, :, 0] + E[:, :, 1]
    for m in range(2, M):
        acc += E[:, :, m]
    acc *= np.float32(1.0 / M)
    return acc


def simus_multi(x, z, RC, delays, param, freq_step=1.0, chunk=3000):
    """RF channel data (nt, Nelements, ntx) of pymust.simus (2-D: y = 0; soft baffle;
    frequency-independent directivity; element splitting as pymust's default) for every row of
    `delays`, in one frequency sweep: the element-scatterer exponentials are computed once and
    shared by all transmits. x, z in m (pymust coordinates)."""
    p = copy.deepcopy(param)
    c = p.c
    fc = p.fc
    delays = np.atleast_2d(np.asarray(delays, dtype=np.float64))
    ntx, Ne = delays.shape
    x = np.asarray(x, np.float64).ravel()
    z = np.asarray(z, np.float64).ravel()
    RC = np.asarray(RC, np.float32).ravel()
    xe, ze, THe, h = p.getElementPositions()
    xe, ze, THe = xe.ravel(), ze.ravel(), THe.ravel()
    maxD = 0.0
    for i0 in range(0, len(x), 20000):
        d2 = (x[i0:i0 + 20000, None] - xe[None]) ** 2 + (z[i0:i0 + 20000, None] - ze[None]) ** 2
        maxD = max(maxD, float(np.sqrt(d2.max())))
    _, tp = _getpulse(p, 2)
    maxD = maxD + tp[-1] * c
    T_needed = 2 * maxD / c + max(delays.max(), 0.0)  # longest echo (s)
    df = 1 / 2 / T_needed * freq_step
    Nf = 2 * int(np.ceil(fc / df)) + 1
    f = np.linspace(0, 2 * fc, Nf)
    df = f[1]
    pulseSpectrum = p.getPulseSpectrumFunction(None)
    probeSpectrum = p.getProbeFunction()
    S = np.abs(pulseSpectrum(2 * np.pi * f) * probeSpectrum(2 * np.pi * f))
    GdB = 20 * np.log10(1e-200 + S / S.max())
    ids = np.where(GdB > -100)[0]
    IDX = np.zeros(f.shape, bool)
    IDX[ids[0]:ids[-1] + 1] = True
    fk = f[IDX]
    nS = len(fk)
    pulseSPECT = pulseSpectrum(2 * np.pi * fk)
    probeSPECT = probeSpectrum(2 * np.pi * fk)
    width = p.width
    LambdaMin = c / (fc * (1 + p.bandwidth / 200))
    Mseg = int(np.ceil(width / LambdaMin))
    SegLength = width / Mseg
    tmp = -width / 2 + SegLength / 2 + np.arange(Mseg) * SegLength
    xi = tmp[None, None, :] * np.cos(THe)[None, :, None]
    zi = tmp[None, None, :] * np.sin(-THe)[None, :, None]
    alpha_dB = p.attenuation
    R = p.radius
    kc = 2 * np.pi * fc / c
    kw_all = 2 * np.pi * fk / c
    DEL = np.exp(1j * kw_all[:, None, None] * c * delays[None]).astype(np.complex64)  # (nS, ntx, Ne)
    SPECT = np.zeros((nS, ntx, Ne), np.complex64)
    for i0 in range(0, len(x), chunk):
        xs = x[i0:i0 + chunk].astype(np.float32)
        zs = z[i0:i0 + chunk].astype(np.float32)
        rc = RC[i0:i0 + chunk]
        isOUT = zs < 0
        if np.isfinite(R):
            isOUT |= (xs ** 2 + (zs + h.ravel()[0]) ** 2) <= R ** 2
        dxi = xs[:, None, None] - xi - xe[None, :, None]
        dd2 = dxi ** 2 + (zs[:, None, None] - zi - ze[None, :, None]) ** 2
        r = np.sqrt(dd2).astype(np.float32)
        r[r < c / fc / 2] = c / fc / 2
        Th = np.arcsin((dxi + _EPS) / (np.sqrt(dd2) + _EPS)) - THe[None, :, None]
        Obli = np.cos(Th).astype(np.float32)
        Obli[np.abs(Th) >= np.pi / 2] = _EPS
        kwa = alpha_dB / 8.69 * fk[0] / 1e6 * 1e2
        EXP = np.exp(-kwa * r + 1j * np.mod(kw_all[0] * r, 2 * np.pi)).astype(np.complex64)
        dkw = 2 * np.pi * df / c
        dkwa = alpha_dB / 8.69 * df / 1e6 * 1e2
        EXPdf = np.exp((-dkwa + 1j * dkw) * r).astype(np.complex64)
        EXP = (EXP * Obli / np.sqrt(r) * _sinc(kc * SegLength / 2 * np.sin(Th))).astype(np.complex64)
        del dxi, dd2, Th, Obli, r
        for k in range(nS):
            if k > 0:
                EXP *= EXPdf
            RPmono = _segmean(EXP, Mseg)
            RPk = RPmono @ DEL[k].T  # (n, ntx)
            RPk *= pulseSPECT[k] * probeSPECT[k]
            RPk[isOUT] = 0
            SPECT[k] += probeSPECT[k] * ((RPk * rc[:, None]).T @ RPmono)
    SPECT *= df * width
    RFspectrum = np.zeros((Nf, ntx, Ne), np.complex64)
    RFspectrum[IDX] = SPECT
    nf = int(np.ceil(p.fs / 2 / fc * (Nf - 1)))
    RF = np.fft.irfft(np.conj(RFspectrum), nf, axis=0)
    # pymust.simus keeps the first half of the period 1/df (= T_needed when freq_step = 1).
    # With 1 < freq_step < 2 the period 2*T_needed/freq_step still exceeds the echo duration,
    # so nothing wraps around: keep the whole echo.
    keep = (nf + 1) // 2 if freq_step <= 1 else min(nf, int(np.ceil(T_needed * p.fs)) + 2)
    RF = RF[:keep]
    return np.ascontiguousarray(np.transpose(RF, (0, 2, 1))).astype(np.float32)


def simus_reference(x, z, RC, delays, param):
    """The same with pymust.simus, one call per transmit (slow path, for checking)."""
    out = []
    delays = np.atleast_2d(delays)
    # one common time window for all transmits, as simus_multi uses
    for i in range(delays.shape[0]):
        opt = mu.Options()
        opt.ParPool = False
        opt.WaitBar = False
        RF = pymust.simus(x, z, RC, delays[i:i + 1], copy.deepcopy(param), opt)[0]
        out.append(RF)
    n = min(r.shape[0] for r in out)
    return np.stack([r[:n] for r in out], axis=2).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Beamforming
# --------------------------------------------------------------------------------------------

def das_compound(IQ, delays, param, X, Z, fnumber, apod="hann"):
    """Coherently compounded delay-and-sum of I/Q channel data IQ (nt, Ne, ntx) onto points
    (X, Z) [m], with pymust.dasmtx's conventions: transmit distance = min over the (4x spline
    interpolated) transmitting aperture of (delay*c + distance); receive f-number aperture;
    linear interpolation of I/Q; phase rotation exp(i*wc*tau). `apod` = 'hann' weights the
    receive aperture with a Hann window (as scanners do, against side/grating lobes); 'none' is
    pymust.dasmtx's uniform weighting (used by --selftest)."""
    from scipy.interpolate import CubicSpline
    p = param
    c, fs, fc = p.c, p.fs, p.fc
    wc = 2 * np.pi * fc
    xe, ze, THe, _ = p.getElementPositions()
    xe, ze, THe = xe.ravel(), ze.ravel(), THe.ravel()
    nt, Ne, ntx = IQ.shape
    X = X.astype(np.float64)
    Z = Z.astype(np.float64)
    out = np.zeros(X.shape, np.complex128)
    linear = np.isinf(p.radius)
    # receive geometry per element (shared by all transmits)
    rx = []
    for e in range(Ne):
        dx = X - xe[e]
        dz = Z - ze[e]
        dR = np.sqrt(dx * dx + dz * dz)
        if linear:
            rel = np.abs(dx) / np.maximum(Z / 2 / fnumber, 1e-12)
        else:
            rel = np.abs(np.arcsin(np.clip(dx / np.maximum(dR, 1e-12), -1, 1)) - THe[e]) / np.arctan(1 / 2 / fnumber)
        idx = np.nonzero(rel <= 1.0)[0].astype(np.int32)
        w_ap = 0.5 * (1 + np.cos(np.pi * rel[idx])) if apod == "hann" else np.ones(len(idx))
        rx.append((idx, dR[idx], w_ap))
    ii = np.linspace(0, Ne - 1, 4 * Ne)
    e_idx = np.arange(Ne)
    xTi = CubicSpline(e_idx, xe)(ii)
    zTi = np.zeros_like(xTi) if linear else CubicSpline(e_idx, ze)(ii)
    for t in range(ntx):
        dTi = CubicSpline(e_idx, delays[t])(ii)
        dTX = np.full(X.shape, np.inf)
        for k in range(len(ii)):
            np.minimum(dTX, dTi[k] * c + np.hypot(X - xTi[k], Z - zTi[k]), out=dTX)
        sig = IQ[:, :, t]
        for e in range(Ne):
            idx, dR, w_ap = rx[e]
            if len(idx) == 0:
                continue
            tau = (dTX[idx] + dR) / c
            fi = tau * fs
            ok = (fi >= 0) & (fi <= nt - 2)
            fi = fi[ok]
            i0 = fi.astype(np.int64)
            w = fi - i0
            col = sig[:, e]
            v = col[i0] * (1 - w) + col[i0 + 1] * w
            out[idx[ok]] += v * np.exp(1j * wc * tau[ok]) * w_ap[ok]
    return out


def das_reference(IQ, delays, param, X, Z, fnumber):
    p = copy.deepcopy(param)
    p.fnumber = fnumber
    out = 0
    for t in range(IQ.shape[2]):
        M = pymust.dasmtx(IQ[:, :, t], X, Z, delays[t], p, "linear")
        out = out + M @ IQ[:, :, t].flatten(order="F")
    return out


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------

def transmit_plan(geo, rng):
    p = geo.param
    if geo.kind == "linear":
        n = int(rng.choice([1, 3, 5, 7, 9, 11, 15], p=[0.12, 0.22, 0.2, 0.16, 0.12, 0.1, 0.08]))
        if n == 1:
            tilts = np.array([0.0])
            span = 0.0
        else:
            # degrees, +-span [montaldo2009]; the L22-14v's pitch exceeds a wavelength, so it is
            # steered less (grating lobes)
            span = _u(rng, 3.0, 8.0) if geo.probe == "L22-14v" else _u(rng, 5.0, 15.0)
            tilts = np.radians(np.linspace(-span, span, n))
        delays = pymust.txdelay(copy.deepcopy(p), tilts)
        desc = f"{n} plane wave{'s' if n > 1 else ''}" + (f" (+-{span:.1f} deg)" if n > 1 else " (0 deg)")
        return np.atleast_2d(delays), desc
    n = int(rng.choice([1, 3, 5, 7, 9], p=[0.15, 0.3, 0.25, 0.2, 0.1]))
    h = geo.h * 1e-3
    if n == 1:
        xs = np.array([0.0])
        span = 0.0
    else:
        span = _u(rng, 5.0, 15.0)  # mm lateral spread of the virtual sources
        xs = np.linspace(-span, span, n) * 1e-3
    rows = []
    for x0 in xs:
        d = pymust.txdelay(float(x0), float(-h), copy.deepcopy(p))
        rows.append(np.asarray(d).ravel())
    desc = f"{n} diverging wave{'s' if n > 1 else ''}" + (f" (virtual sources at the centre of curvature, +-{span:.1f} mm)" if n > 1 else " (virtual source at the centre of curvature)")
    return np.array(rows), desc


def choose_spacing(probe, depth, rng):
    if probe == "L22-14v":
        return 0.04  # lambda = 0.086 mm at 18 MHz
    if PROBES[probe]["kind"] == "linear":
        lo = max(0.08, depth / 480.0)
        hi = min(0.12, depth / 250.0)
        return round(_u(rng, lo, max(lo, hi)), 4)
    return None


def simulate_case(name, seed, probe, site, set_name, engine="multi", freq_step=1.8, log=print):
    rng = np.random.default_rng(seed)
    t_start = time.time()
    spec = PROBES[probe]
    depth = round(_u(rng, *spec["depth"]), 1)
    s = choose_spacing(probe, depth, rng)
    if s is None:  # convex: spacing from the fan size (<= 480 px both ways)
        R = probe_param(probe).radius * 1e3
        ha = math.radians(27.0)
        s = round(max(2 * (R + depth) * math.sin(ha) / 470.0, (depth + R * (1 - math.cos(ha))) / 470.0) * _u(rng, 1.0, 1.08), 4)
    geo = Geometry(probe, depth, s, rng)
    a = build_anatomy(geo, site, rng)
    kind, (tx_, tz_), tol = target_of(a)
    delays, tx_desc = transmit_plan(geo, rng)
    p = geo.param
    lam = C_SOUND / p.fc * 1e3
    axial = C_SOUND / (2 * p.bandwidth / 100 * p.fc) * 1e3
    cell = axial * lam * 1.5
    density = _u(rng, 1.2, 2.0) / cell  # scatterers per resolution cell
    X, Z, RC = make_scatterers(a, rng, density)
    xm, zm = geo.to_pymust(X, Z)
    t0 = time.time()
    if engine == "simus":
        RF = simus_reference(xm, zm, RC, delays, p)
    else:
        RF = simus_multi(xm, zm, RC, delays, p, freq_step=freq_step)
    t_sim = time.time() - t0
    IQ = np.stack([pymust.rf2iq(np.ascontiguousarray(RF[:, :, t]), copy.deepcopy(p)) for t in range(RF.shape[2])], axis=2)
    # beamform onto the display grid
    PX, PZ = geo.pixel_grid()
    inside = geo.inside(PX, PZ)
    bx, bz = geo.to_pymust(PX[inside], PZ[inside])
    fnum = round(_u(rng, 1.2, 2.0), 2)
    t1 = time.time()
    if engine == "simus":
        bf = das_reference(IQ, delays, copy.deepcopy(p), bx, bz, fnum)
    else:
        bf = das_compound(IQ, delays, p, bx, bz, fnum, apod="hann")
    t_das = time.time() - t1
    env = np.zeros(PX.shape)
    env[inside] = np.abs(bf)
    _, _, lab = a.evaluate(PX, PZ)
    lab = np.where(inside, lab, 0).astype(np.uint8)
    tissue = inside & (lab == 0)
    # TGC: the sonographer's law, roughly the muscle attenuation (0.8-1.05 x), plus a smooth
    # random error curve (+-3 dB)
    U, Dd = geo.xz_to_ud(PX, PZ)
    fmhz = p.fc / 1e6
    knots = rng.uniform(-3.0, 3.0, 4)
    err = np.interp(Dd / max(depth, 1e-6), np.linspace(0, 1, 4), knots)
    att_tgc = ATT["MUSCLE"] * _u(rng, 0.8, 1.05)
    tgc_db = 2 * att_tgc * fmhz * (np.maximum(Dd, 0) / 10.0) + err
    env = env * 10 ** (tgc_db / 20)
    # reference level: median tissue echo in the upper two thirds sits at grey `anchor` at 0 dB gain
    sel = tissue & (Dd < depth * 0.66)
    if sel.sum() < 100:
        sel = inside
    ref = float(np.median(env[sel]))
    # electronic noise, white before the TGC: `noise_db` below the tissue level at the deepest row
    noise_db = _u(rng, -32.0, -18.0)
    namp = ref * 10 ** (noise_db / 20) * 10 ** ((tgc_db - tgc_db[inside].max()) / 20)
    nz = (rng.standard_normal(env.shape) + 1j * rng.standard_normal(env.shape)) / math.sqrt(2)
    env = np.abs(env * np.exp(1j * rng.uniform(0, 2 * np.pi, env.shape)) + namp * nz)
    env[~inside] = 0
    dr = round(_u(rng, 40.0, 70.0), 1)
    gain = round(_u(rng, -4.0, 4.0), 1)
    anchor = round(_u(rng, 75.0, 105.0), 1)
    img = to_grey(env, inside, ref, dr, gain, anchor)
    info = dict(depth=depth, s=s, tx=tx_desc, dr=dr, gain=gain, anchor=anchor, ref=ref, fnum=fnum,
                density=density, n_scat=len(RC), t_sim=t_sim, t_das=t_das, noise_db=noise_db,
                tgc_err=knots.tolist())
    truth = make_truth(name, seed, set_name, geo, a, kind, (tx_, tz_), tol, info)
    info["t_total"] = time.time() - t_start
    log(f"{name}: {probe} {site} {a.scene} depth {depth} mm, {geo.W}x{geo.H} px @ {s} mm, {tx_desc}, "
        f"{len(RC)} scatterers, simus {t_sim:.1f} s, DAS {t_das:.1f} s, total {info['t_total']:.1f} s")
    return dict(img=img, lab=lab, env=env, inside=inside, truth=truth, info=info, geo=geo, anat=a)


def to_grey(env, inside, ref, dr, gain, anchor):
    """Log compression (pymust.bmode's 20*log10 law) over `dr` dB, with the reference tissue
    level at grey `anchor` at 0 dB gain."""
    db = 20 * np.log10(np.maximum(env, 1e-30) / ref) + gain
    g = anchor + 255.0 / dr * db
    g = np.clip(np.round(g), 0, 255).astype(np.uint8)
    g[~inside] = 0
    return g


def make_truth(name, seed, set_name, geo, a, kind, target, tol, info):
    s = geo.s
    ref = geo.ref

    def px(x, z):
        c, r = geo.xz_to_px(x, z)
        return [float(c), float(r)]

    def mm(pt):
        return [(pt[0] - ref[0]) * s, (pt[1] - ref[1]) * s]

    polylines = []
    if a.bones:
        lo, hi = geo.u_range()
        if geo.kind == "convex":
            hi = (geo.R + geo.depth) * math.sin(geo.half_angle)
            lo = -hi
        for b in a.bones:
            xs = np.arange(max(b.x0, lo), min(b.x1, hi) + 1e-9, s)
            if len(xs) == 0:
                continue
            zs = b.f(xs)
            u, d = geo.xz_to_ud(xs, zs)
            vis = np.abs(a.bone_depth_ray(u) - d) < 0.05
            ok = geo.inside(xs, zs) & vis
            cur = []
            for x, z, o in zip(xs, zs, ok):
                if o:
                    cur.append(px(x, z))
                elif cur:
                    if len(cur) > 1:
                        polylines.append(cur)
                    cur = []
            if len(cur) > 1:
                polylines.append(cur)
    polys_mm = [[mm(q) for q in l] for l in polylines]
    tpx = px(*target)
    inside = bool(geo.inside(np.array(target[0]), np.array(target[1])))
    forbidden = [dict(kind="bone", points_px=l, points_mm=m, radius_mm=None) for l, m in zip(polylines, polys_mm)]
    for v in a.vessels:
        c = px(v["xc"], v["zc"])
        if geo.inside(np.array(v["xc"]), np.array(v["zc"])):
            forbidden.append(dict(kind="vessel", points_px=[c], points_mm=[mm(c)], radius_mm=round(max(v["a"], v["b"]), 3)))
    for nv in a.nerves:
        c = px(nv["xc"], nv["zc"])
        if geo.inside(np.array(nv["xc"]), np.array(nv["zc"])):
            forbidden.append(dict(kind="nerve", points_px=[c], points_mm=[mm(c)], radius_mm=round(max(nv["a"], nv["b"]), 3)))
    t = dict(
        name=name,
        seed=int(seed),
        geometry="linear" if geo.kind == "linear" else "curved",
        size_px=[geo.W, geo.H],
        spacing_mm=[s, s],
        reference_px=[float(ref[0]), float(ref[1])],
        region=geo.region(),
        scene=a.scene,
        target_kind=kind,
        frequency_mhz=round(geo.param.fc / 1e6, 3),
        forbidden=forbidden,
        frames=[dict(index=0, bone_polylines_px=polylines, bone_polylines_mm=polys_mm,
                     target_px=tpx if inside else None, target_mm=mm(tpx) if inside else None)],
        source="pusim",
        probe=geo.probe,
        set=set_name,
        site=a.site,
        depth_mm=geo.depth,
        dynamic_range_db=info["dr"],
        gain_db=info["gain"],
        tx=info["tx"],
        target_tolerance_mm=round(tol, 3),
        sizes=a.sizes,
        citations=sorted(a.cites | ({"montaldo2009"} if geo.kind == "linear" else set()) |
                         ({"verasonics_l22"} if geo.probe == "L22-14v" else set())),
        simulation=dict(engine=f"pymust {PYMUST_VERSION}: simus_multi (pfield SIMUS model) + DAS (dasmtx conventions)",
                        rx_fnumber=info["fnum"], scatterers=info["n_scat"],
                        scatterers_per_mm2=round(info["density"], 2),
                        bone_echo_db=round(a.bone_db, 1), shadow_loss_db=round(a.shadow_db, 1),
                        clutter_db=round(a.clutter_db, 1), anisotropy_cos_power=round(a.n_aniso, 1),
                        noise_db=round(info["noise_db"], 1), tgc_error_db=[round(v, 2) for v in info["tgc_err"]],
                        grey_anchor=info["anchor"]),
    )
    if geo.kind == "convex":
        ax, ay = geo.xz_to_px(0.0, -geo.R)
        t["curved"] = dict(apex_px=[float(ax), float(ay)], radius_mm=round(geo.R, 3),
                           half_angle_deg=round(math.degrees(geo.half_angle), 3))
    return t


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def write_dicom(path, img, truth, uid_key):
    import pydicom
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
    sop_uid = generate_uid(entropy_srcs=[uid_key, "instance"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_IMAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid(entropy_srcs=["sonoguide pusim"])
    meta.ImplementationVersionName = "PUSIM_01"
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = US_IMAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid_key, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_key, "series"])
    ds.PatientName = "PUSIM^" + truth["name"]
    ds.PatientID = truth["name"]
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.ContentDate = "20260101"
    ds.ContentTime = "120000"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "US"
    ds.Manufacturer = "sonoguide pusim"
    ds.ManufacturerModelName = truth["probe"]
    ds.SeriesDescription = f"pusim {truth['set']} ({truth['scene']} scene, {truth['probe']})"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.TransducerData = [truth["probe"]]
    r = truth["region"]
    item = Dataset()
    item.RegionSpatialFormat = 1
    item.RegionDataType = 1
    item.RegionFlags = 0
    item.RegionLocationMinX0 = int(r["x0"])
    item.RegionLocationMinY0 = int(r["y0"])
    item.RegionLocationMaxX1 = int(r["x1"]) - 1
    item.RegionLocationMaxY1 = int(r["y1"]) - 1
    item.ReferencePixelX0 = int(round(truth["reference_px"][0])) - int(r["x0"])
    item.ReferencePixelY0 = int(round(truth["reference_px"][1])) - int(r["y0"])
    item.PhysicalUnitsXDirection = 3
    item.PhysicalUnitsYDirection = 3
    item.ReferencePixelPhysicalValueX = 0.0
    item.ReferencePixelPhysicalValueY = 0.0
    item.PhysicalDeltaX = truth["spacing_mm"][0] / 10.0
    item.PhysicalDeltaY = truth["spacing_mm"][1] / 10.0
    ds.SequenceOfUltrasoundRegions = Sequence([item])
    data = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
    if len(data) % 2:
        data += b"\0"  # even value length
    ds.PixelData = data
    ds["PixelData"].VR = "OB"
    ds.save_as(str(path), enforce_file_format=True)


def write_png(path, arr):
    from PIL import Image
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="L").save(str(path), optimize=True)


def _rounded(o, nd=4):
    if isinstance(o, float):
        return round(o, nd)
    if isinstance(o, dict):
        return {k: _rounded(v, nd) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_rounded(v, nd) for v in o]
    return o


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(_rounded(obj), f, separators=(",", ":"))
        f.write("\n")


def write_case(out_dir, res, pert_dir=None):
    t = res["truth"]
    name = t["name"]
    write_dicom(os.path.join(out_dir, name + ".dcm"), res["img"], t, f"pusim/{name}/{t['seed']}")
    write_png(os.path.join(out_dir, name + ".truth.png"), res["lab"])
    write_json(os.path.join(out_dir, name + ".truth.json"), t)
    if pert_dir is None:
        return
    info = res["info"]
    for suffix, gain, dr, pert in (
            ("_g+6", info["gain"] + 6.0, info["dr"], dict(kind="gain", delta_db=6.0)),
            ("_g-6", info["gain"] - 6.0, info["dr"], dict(kind="gain", delta_db=-6.0)),
            ("_dr40", info["gain"], 40.0, dict(kind="dynamic_range", dynamic_range_db=40.0)),
            ("_dr70", info["gain"], 70.0, dict(kind="dynamic_range", dynamic_range_db=70.0))):
        img = to_grey(res["env"], res["inside"], info["ref"], dr, gain, info["anchor"])
        tt = copy.deepcopy(t)
        tt["name"] = name + suffix
        tt["gain_db"] = round(gain, 1)
        tt["dynamic_range_db"] = dr
        pert.update(of=name, original_gain_db=info["gain"], original_dynamic_range_db=info["dr"],
                    note="same beamformed envelope, re-compressed; not re-simulated")
        tt["perturbation"] = pert
        write_dicom(os.path.join(pert_dir, tt["name"] + ".dcm"), img, tt, f"pusim/{tt['name']}/{t['seed']}")
        write_png(os.path.join(pert_dir, tt["name"] + ".truth.png"), res["lab"])
        write_json(os.path.join(pert_dir, tt["name"] + ".truth.json"), tt)


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------

def plan_cases(count, seed, probes, scenes):
    """A deterministic list of (name, seed, probe, site). About 20 % soft tissue (bone-free) among
    the non-nerve scenes; probes balanced as asked."""
    rng = np.random.default_rng(seed)
    sites_by_scene = {}
    for site, spec in SITES.items():
        sites_by_scene.setdefault(spec["scenes"][0], []).append(site)
    scenes = [s for s in scenes if s in sites_by_scene]
    if scenes == ["nerve"]:
        weights = {"nerve": 1.0}
    else:
        weights = {"joint": 0.4, "bone": 0.4, "soft_tissue": 0.2, "nerve": 0.2}
    wsum = sum(weights[s] for s in scenes)
    quota = {s: weights[s] / wsum * count for s in scenes}
    counts = {s: int(math.floor(q)) for s, q in quota.items()}
    rest = count - sum(counts.values())
    for s in sorted(scenes, key=lambda s: quota[s] - counts[s], reverse=True)[:rest]:
        counts[s] += 1
    # probe share: linear probes ~ 60 %, convex ~ 40 % (within what each site allows)
    plan = []
    order = []
    for s in scenes:
        order += [s] * counts[s]
    rng.shuffle(order)
    probe_cycle = {}
    site_cycle = {}
    for scene in scenes:  # round-robin over the sites of each scene, in a shuffled order
        sites = [s for s in sites_by_scene[scene] if any(p in probes for p in SITES[s]["probes"])]
        rng.shuffle(sites)
        site_cycle[scene] = [sites, 0]
    for i, scene in enumerate(order):
        sites, k = site_cycle[scene]
        if not sites:
            continue
        site = sites[k % len(sites)]
        site_cycle[scene][1] = k + 1
        allowed = [p for p in SITES[site]["probes"] if p in probes]
        k = probe_cycle.get(site, int(rng.integers(0, len(allowed))))
        probe = allowed[k % len(allowed)]
        probe_cycle[site] = k + 1
        plan.append((scene, site, probe))
    return plan


def balance_probes(plan, want_convex, rng):
    """Re-assign probes (where the site allows) so that about `want_convex` cases are convex."""
    plan = list(plan)
    conv = [i for i, (_, _, p) in enumerate(plan) if p == "C5-2v"]
    can_conv = [i for i, (_, s, p) in enumerate(plan) if p != "C5-2v" and "C5-2v" in SITES[s]["probes"]]
    can_lin = [i for i, (_, s, p) in enumerate(plan) if p == "C5-2v" and any(q != "C5-2v" for q in SITES[s]["probes"])]
    rng.shuffle(can_conv)
    rng.shuffle(can_lin)
    while len(conv) < want_convex and can_conv:
        i = can_conv.pop()
        plan[i] = (plan[i][0], plan[i][1], "C5-2v")
        conv.append(i)
    while len(conv) > want_convex and can_lin:
        i = can_lin.pop()
        s = plan[i][1]
        plan[i] = (plan[i][0], s, [q for q in SITES[s]["probes"] if q != "C5-2v"][0])
        conv.remove(i)
    # among the linear cases, alternate the two linear probes where allowed
    lin = [i for i, (_, s, p) in enumerate(plan) if p != "C5-2v"]
    for k, i in enumerate(lin):
        s = plan[i][1]
        opts = [q for q in SITES[s]["probes"] if q != "C5-2v"]
        if len(opts) > 1:
            plan[i] = (plan[i][0], s, opts[k % len(opts)])
    return plan


# --------------------------------------------------------------------------------------------
# Self test: the fast paths against pymust.simus / pymust.dasmtx
# --------------------------------------------------------------------------------------------

def selftest():
    rng = np.random.default_rng(7)
    for probe in ("L11-5v", "C5-2v"):
        p = probe_param(probe)
        n = 400
        if probe == "L11-5v":
            x = rng.uniform(-15e-3, 15e-3, n)
            z = rng.uniform(2e-3, 25e-3, n)
            delays = pymust.txdelay(copy.deepcopy(p), np.radians([-8.0, 0.0, 8.0]))
        else:
            th = rng.uniform(-0.4, 0.4, n)
            r = rng.uniform(p.radius + 2e-3, p.radius + 40e-3, n)
            _, _, _, h = p.getElementPositions()
            x = r * np.sin(th)
            z = r * np.cos(th) - float(h.ravel()[0])
            delays = np.array([pymust.txdelay(0.0, -float(h.ravel()[0]), copy.deepcopy(p)).ravel(),
                               pymust.txdelay(0.006, -float(h.ravel()[0]), copy.deepcopy(p)).ravel()])
        RC = rng.standard_normal(n)
        t0 = time.time()
        A = simus_multi(x, z, RC, delays, p, freq_step=1.0)
        ta = time.time() - t0
        t0 = time.time()
        B = simus_reference(x, z, RC, delays, p)
        tb = time.time() - t0
        # pymust.simus picks its time window per transmit, so compare the transmit whose
        # largest delay equals the common one
        k = int(np.argmax(delays.max(axis=1)))
        m = min(A.shape[0], B.shape[0])
        err = np.abs(A[:m, :, k] - B[:m, :, k]).max() / np.abs(B[:m, :, k]).max()
        print(f"{probe}: simus_multi vs pymust.simus, transmit {k}: max rel. error {err:.2e} "
              f"({ta:.1f} s vs {tb:.1f} s)")
        IQ = np.stack([pymust.rf2iq(np.ascontiguousarray(A[:, :, t]), copy.deepcopy(p)) for t in range(A.shape[2])], axis=2)
        gx, gz = np.meshgrid(np.linspace(-10e-3, 10e-3, 60), np.linspace(5e-3, 30e-3, 60))
        if probe == "C5-2v":
            gz = gz + 0.01
        bx, bz = gx.ravel(), gz.ravel()
        t0 = time.time()
        a1 = das_compound(IQ, delays, p, bx, bz, 1.5, apod="none")
        ta = time.time() - t0
        t0 = time.time()
        a2 = das_reference(IQ, delays, p, bx, bz, 1.5)
        tb = time.time() - t0
        err = np.abs(a1 - a2).max() / np.abs(a2).max()
        print(f"{probe}: das_compound vs pymust.dasmtx: max rel. error {err:.2e} ({ta:.1f} s vs {tb:.1f} s)")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--set", choices=("tune", "test"), default="tune")
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--probes", default="L11-5v,L22-14v,C5-2v")
    ap.add_argument("--scenes", default="joint,bone,soft_tissue",
                    help="comma list of joint,bone,soft_tissue,nerve (default without nerve)")
    ap.add_argument("--sites", default=None,
                    help="comma list of sites to cycle through (default: by --scenes)")
    ap.add_argument("--effusion", choices=("random", "always"), default="random",
                    help="always: every bone scene gets its effusion or bursa")
    ap.add_argument("--convex", type=int, default=None, help="number of convex cases (default ~40 %%)")
    ap.add_argument("--prefix", default=None, help="case name prefix (default pusim_SET)")
    ap.add_argument("--perturbed-out", default=None,
                    help="directory for the gain/DR variants (default: none for tune, OUT/../test-perturbed for test)")
    ap.add_argument("--jobs", type=int, default=1, help="processes (only 1 is supported)")
    ap.add_argument("--engine", choices=("multi", "simus"), default="multi")
    ap.add_argument("--freq-step", type=float, default=1.8,
                    help="SIMUS frequency step factor (<2 keeps the time window alias-free)")
    ap.add_argument("--only", type=int, default=None, help="simulate only case index N (0-based)")
    ap.add_argument("--done-file", action="store_true", help="write OUT/DONE when finished")
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--dry", action="store_true", help="lay out every scene (no simulation) and exit")
    args = ap.parse_args(argv)
    if args.selftest:
        selftest()
        return 0
    if args.jobs != 1:
        print("note: --jobs > 1 not supported; using one process", file=sys.stderr)
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    for p in probes:
        if p not in PROBES:
            ap.error(f"unknown probe {p}")
    scenes = [s.strip() for s in args.scenes.split(",") if s.strip()]
    prefix = args.prefix or f"pusim_{args.set}"
    global FORCE_EFFUSION
    FORCE_EFFUSION = args.effusion == "always"
    if args.sites:
        sites = [x.strip() for x in args.sites.split(",") if x.strip()]
        for x in sites:
            if x not in SITES:
                ap.error(f"unknown site {x}")
        plan = []
        for i in range(args.count):
            site = sites[i % len(sites)]
            allowed = [p for p in SITES[site]["probes"] if p in probes] or list(SITES[site]["probes"])
            plan.append((SITES[site]["scenes"][0], site, allowed[(i // len(sites)) % len(allowed)]))
    else:
        plan = plan_cases(args.count, args.seed, probes, scenes)
    if "C5-2v" in probes and not args.sites:
        want = args.convex if args.convex is not None else int(round(0.4 * len(plan)))
        plan = balance_probes(plan, want, np.random.default_rng(args.seed + 1))
    cases = [(f"{prefix}_{i + 1:03d}", args.seed * 1000 + i + 1, probe, site)
             for i, (_, site, probe) in enumerate(plan)]
    if args.list:
        for c in cases:
            print(*c)
        return 0
    if args.dry:
        for (name, seed, probe, site) in cases:
            rng = np.random.default_rng(seed)
            depth = round(_u(rng, *PROBES[probe]["depth"]), 1)
            s_ = choose_spacing(probe, depth, rng) or 0.2
            geo = Geometry(probe, depth, s_, rng)
            a = build_anatomy(geo, site, rng)
            k, tgt, tol = target_of(a)
            PX, PZ = geo.pixel_grid()
            _, _, lab = a.evaluate(PX, PZ)
            lab[~geo.inside(PX, PZ)] = 0
            inside_t = bool(geo.inside(np.array(tgt[0]), np.array(tgt[1])))
            c, r = geo.xz_to_px(*tgt)
            tl = int(lab[int(round(float(r))), int(round(float(c)))]) if inside_t else -1
            print(name, probe, site, a.scene, k, "target label", tl, "tol", round(tol, 2),
                  "labels", np.unique(lab).tolist(), "vessels", len(a.vessels), flush=True)
        return 0
    if not args.out:
        ap.error("--out is required")
    os.makedirs(args.out, exist_ok=True)
    pert = args.perturbed_out
    if pert is None and args.set == "test":
        pert = os.path.join(os.path.dirname(os.path.abspath(args.out)), "test-perturbed")
    pert = pert or None  # --perturbed-out '' disables the variants
    if pert:
        os.makedirs(pert, exist_ok=True)

    def log(msg):
        print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)

    log(f"pymust {PYMUST_VERSION}, numpy {np.__version__}, {len(cases)} cases -> {args.out}")
    for i, (name, seed, probe, site) in enumerate(cases):
        if args.only is not None and i != args.only:
            continue
        if os.path.exists(os.path.join(args.out, name + ".truth.json")) and args.only is None:
            log(f"{name}: exists, skipped")
            continue
        res = None
        for attempt in range(4):
            # a scene that cannot be laid out (or any other failure) is redrawn with another seed
            try:
                res = simulate_case(name, seed + 100000 * attempt, probe, site, args.set,
                                    engine=args.engine, freq_step=args.freq_step, log=log)
                break
            except Exception as exc:  # noqa: BLE001
                import traceback
                log(f"{name}: attempt {attempt} failed: {exc!r}\n{traceback.format_exc()}")
        if res is None:
            log(f"{name}: FAILED, skipped")
            continue
        write_case(args.out, res, pert)
    if args.done_file and args.only is None:
        with open(os.path.join(args.out, "DONE"), "w") as f:
            f.write(f"{len(cases)} cases, {datetime.datetime.now().isoformat(timespec='seconds')}\n")
        if pert:
            with open(os.path.join(pert, "DONE"), "w") as f:
                f.write(f"{4 * len(cases)} variants, {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
