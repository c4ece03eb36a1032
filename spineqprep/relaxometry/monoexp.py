"""Voxel-wise mono-exponential relaxometry: S(t) = S0 exp(-t / T) [+ C].

One least-squares problem per voxel, solved for all voxels of a chunk at once with numpy:

1. a log-linear initial estimate of R = 1/T (weighted by S^2, which makes it close to the
   least-squares answer);
2. Levenberg-Marquardt on R with the linear parameters projected out (variable projection:
   given R, the best S0 -- and C for the offset model -- are closed-form). The reduced cost
   has the same minimiser as the full two- (three-) parameter problem, so the maps are the
   ones per-voxel ``scipy.optimize.curve_fit`` finds. Steps use the exact second derivative
   of the reduced cost when it is positive (Newton, quadratic convergence) and the
   Gauss-Newton curvature otherwise; a step that raises the cost is rejected and damped.

Working in R keeps "no decay" (R <= 0) a finite point of the search instead of T = inf.
Voxels are fitted in chunks of ``chunk_size`` (work buffers reused: intermediates stay in
cache, memory stays bounded). Converged voxels are frozen and, once fewer than half still
move, the rest are gathered into a smaller problem: a voxel's result does not depend on its
neighbours in the chunk (other chunk sizes change results by at most an ulp of BLAS rounding).

``n_threads > 1`` forks that many worker processes which take batches of chunks: the signal
is shared copy-on-write, the output maps live in anonymous shared memory, so only chunk
indices travel. Processes rather than threads: about 14 % of each chunk is Python code
holding the GIL, and threads on two vCPUs were measured no faster than one. Every worker
fits the same chunks with the same code, so the maps are bit-for-bit those of the serial
fit. BLAS is held to one thread throughout (its small matrix products would otherwise
spawn threads on top of the workers).

Nothing is clipped: a voxel whose fit fails or leaves the plausible range keeps ``valid``
False with a reason code (``REASONS``), and its T is NaN where no finite estimate exists.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import connection
from multiprocessing.connection import Connection
from typing import Any, Literal

import numpy as np
from threadpoolctl import threadpool_limits

from spineqprep.errors import InputError, SpineqprepError, UsageError

__all__ = ["REASONS", "MonoexpFit", "crlb_monoexp", "fit_monoexp"]

#: Reason codes stored in ``MonoexpFit.reason`` (index = code). 0 means a valid voxel.
REASONS: tuple[str, ...] = (
    "valid",
    "outside_mask",
    "nonfinite_signal",
    "nonpositive_signal",
    "flat_signal",
    "not_converged",
    "no_decay",
    "t_out_of_range",
    "s0_nonpositive",
)
_OUTSIDE, _NONFINITE, _NONPOS, _FLAT, _NOCONV, _NODECAY, _RANGE, _S0NEG = range(1, 9)

Model = Literal["monoexp", "offset"]
Progress = Callable[[int, int], None]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MonoexpFit:
    """Maps of one fit, each of shape ``signal.shape[:-1]``.

    ``t`` is in the unit of ``times`` (seconds); it is NaN where no finite estimate exists
    (outside the mask, bad signal, no decay, not converged) and keeps the fitted value where
    the fit worked but T or S0 is implausible (``valid`` False, reason says why).
    """

    t: np.ndarray
    s0: np.ndarray
    offset: np.ndarray | None
    r2: np.ndarray
    valid: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    reason: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)


def crlb_monoexp(
    times: np.ndarray, t: np.ndarray | float, snr: float, model: Model = "monoexp"
) -> np.ndarray:
    """Cramer-Rao lower bound on the SD of T for Gaussian noise, SNR = S0 / sigma.

    Returned in the unit of ``times`` and ``t``; divide by ``t`` for the relative bound.
    """
    tk = np.asarray(times, dtype=np.float64)
    tt = np.atleast_1d(np.asarray(t, dtype=np.float64))
    e = np.exp(-tk[None, :] / tt[:, None])  # S0 = 1, sigma = 1 / snr
    cols = [e, tk[None, :] * e / tt[:, None] ** 2]
    if model == "offset":
        cols.append(np.ones_like(e))
    jac = np.stack(cols, axis=-1)  # (nT, n_times, n_params)
    fisher = np.einsum("vkp,vkq->vpq", jac, jac) * snr**2
    var_t = np.linalg.inv(fisher)[:, 1, 1]
    return np.sqrt(var_t).reshape(np.shape(t))


def _check_times(times: Any, n_frames: int, model: Model) -> np.ndarray:
    """The times as float64 seconds, or an InputError saying what is wrong with them."""
    tk = np.asarray(times, dtype=np.float64)
    if tk.ndim != 1 or tk.size != n_frames:
        raise InputError(
            f"{tk.size} time points given for {n_frames} signal frames",
            fix="give one echo/spin-lock time (seconds) per image frame",
        )
    if not np.all(np.isfinite(tk)) or np.any(tk < 0):
        raise InputError(
            f"times must be finite and non-negative seconds, got {tk.tolist()}",
            fix="check EchoTime / SpinLockTime in the JSON sidecars",
        )
    need = 3 if model == "offset" else 2
    if np.unique(tk).size < need:
        raise InputError(
            f"the {model} model needs at least {need} distinct time points, got {tk.tolist()}",
            fix="provide more echoes / spin-lock times (or use model='monoexp')",
        )
    if tk.max() > 1.0:
        raise InputError(
            f"times look like milliseconds ({tk.tolist()}); they must be in seconds",
            fix="divide the times by 1000",
        )
    return tk


@dataclass(frozen=True)
class _Options:
    times: np.ndarray
    offset: bool
    max_iter: int
    tol: float
    t_lo: float
    t_hi: float


# rows of the per-voxel state array of the solver: R, g(R), the next step on R, S0 at R
# and, for the offset model, P0 = sum(e) (C = mean(y) - S0 P0 / n)
_R, _G, _STEP, _S0, _P0 = range(5)


class _Kernel:
    """Sums over echoes for a block of voxels, in reusable work buffers.

    The sums over echoes of t^p x (per-echo product), p = 0, 1, 2, come from one small matrix
    product (block-diagonal ``[1, t, t^2]``, one block per product; BLAS, single-threaded by
    the caller), which reads each product once. Buffers are flat and carved into contiguous
    (rows, m) views, so a block allocates no large temporaries.
    """

    def __init__(self, opt: _Options, m_max: int):
        tk = opt.times
        self.n = tk.size
        self.offset = opt.offset
        self.neg_t = -tk[:, None]
        powers = np.stack([np.ones_like(tk), tk, tk * tk])  # (3, n): t^0, t^1, t^2
        self.init_sums = np.kron(np.eye(2), powers)[:5]  # w: t^0..t^2; w log: t^0, t^1
        self.k = 3 if opt.offset else 2  # products per echo: y e, e^2 (and e)
        self.sums = np.kron(np.eye(self.k), powers)  # (3k, k n) block diagonal
        self.rows = 5 if opt.offset else 4  # rows of the solver state
        self._work = np.empty(self.k * self.n * m_max)
        self._sums = np.empty(3 * self.k * m_max)
        self._tmp = np.empty(4 * m_max)
        self._block = np.empty(self.n * m_max)
        self._states = (np.empty(self.rows * m_max), np.empty(self.rows * m_max))

    def block(self, m: int) -> np.ndarray:
        """Reusable (n_times, m) float64 buffer for the signal of one block."""
        return self._view(self._block, self.n, m)

    def states(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Two reusable (rows, m) solver-state buffers (current point and trial point)."""
        return self._view(self._states[0], self.rows, m), self._view(self._states[1], self.rows, m)

    @staticmethod
    def _view(buf: np.ndarray, rows: int, m: int) -> np.ndarray:
        return buf[: rows * m].reshape(rows, m)

    def init(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Log-linear R (weights S^2; S <= 0 gets weight 0), sum(y) and sum(y^2)."""
        n, m = y.shape
        x = self._view(self._work, 2 * n, m)
        w, wlog = x[:n], x[n:]
        np.maximum(y, 1e-300, out=w)  # 1e-300 squares to 0: weight 0 for S <= 0
        np.log(w, out=wlog)
        np.multiply(w, w, out=w)
        np.multiply(wlog, w, out=wlog)
        sums = self._view(self._sums, 6, m)
        np.matmul(self.init_sums, x, out=sums[:5])
        np.matmul(self.init_sums[:1, :n], y, out=sums[5:])
        sw, st, stt, sl, stl, sy = sums
        r = st * sl
        r -= sw * stl
        den = sw * stt
        den -= st * st
        r /= den
        # sum(y^2) is sum(w) unless some samples are <= 0 (NaN and inf propagate through w)
        syy = sw.copy() if (y > 0).all() else np.einsum("km,km->m", y, y)
        return r, sy.copy(), syy

    def reduced(self, y: np.ndarray, state: np.ndarray) -> None:
        """Fill the state rows at R = state[_R] for every voxel of the block.

        The variable-projection cost is const - g(R), g = A^2 / B with A = <y, e>,
        B = |e|^2 (both centred for the offset model), e = exp(-R t). Rows written: g, the
        step on R (Newton where the cost is convex there, Gauss-Newton elsewhere), S0 = A / B
        and, for the offset model, P0 = sum(e).
        """
        n, m = y.shape
        x = self._view(self._work, self.k * n, m)
        ye, e2 = x[:n], x[n : 2 * n]
        e = x[2 * n :] if self.offset else e2  # monoexp: e is squared in place
        np.multiply(self.neg_t, state[_R], out=e)
        np.exp(e, out=e)
        np.multiply(y, e, out=ye)
        np.multiply(e, e, out=e2)
        sums = self._view(self._sums, 3 * self.k, m)
        np.matmul(self.sums, x, out=sums)
        # A_p = <y, t^p e>, B_p = <e, t^p e>: A_p' = -A_{p+1}, B_p' = -2 B_{p+1}
        a, a1, a2, b, b1, b2 = sums[:6]
        d, q, w, c2 = self._view(self._tmp, 4, m)
        if self.offset:  # centre A and B: the offset C is projected out too
            p0, p1, p2 = sums[6:]
            state[_P0] = p0
            ybar = y.mean(axis=0)
            a -= ybar * p0
            a1 -= ybar * p1
            a2 -= ybar * p2
            np.multiply(p1, p1, out=w)
            np.divide(w, -n, out=c2)
            c2 += b2  # Gauss-Newton: |de/dR|^2 centred
            w += p0 * p2
            w /= 2 * n
            b2 -= w
            b1 -= p0 * p1 / n
            b -= p0 * p0 / n
        else:
            c2 = b2
        # g' = -2 S0 d with d = A1 - S0 B1; B g''/2 = q^2 + A (A2 - 2 S0 B2), q = 2 S0 B1 - A1;
        # the Newton step -g'/g'' is A d / (B g''/2)
        g, step, s0 = state[_G], state[_STEP], state[_S0]
        np.divide(a, b, out=s0)
        np.multiply(a, s0, out=g)
        np.multiply(s0, b1, out=q)
        np.subtract(a1, q, out=d)
        q -= d
        np.multiply(s0, b2, out=w)
        w += w
        np.subtract(a2, w, out=w)
        w *= a
        half = np.multiply(q, q, out=q)
        half += w
        np.multiply(a, d, out=step)
        step /= half
        concave = half < 0  # g concave <=> cost convex: Newton step
        if not concave.all():
            # Gauss-Newton curvature of the cost: 2 S0^2 (c2 - B1^2 / B) >= 0
            bad = ~concave
            step[bad] = -d[bad] / (s0[bad] * (c2[bad] - b1[bad] ** 2 / b[bad]))


def _solve(
    y: np.ndarray, state: np.ndarray, trial: np.ndarray, kern: _Kernel, opt: _Options, it: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levenberg-Marquardt iterations on R for the voxels (columns) of ``state``.

    ``state`` must hold a first evaluation; ``trial`` is a buffer of the same shape (both
    are reused, the final state is returned); the trial point, once accepted, is the next
    iteration's evaluation. A converged voxel is frozen (step 0, so re-evaluation reproduces
    it bit for bit); once fewer than half of the voxels are still moving they are gathered
    into a smaller problem (recursively), so no voxel's path depends on the others.
    Returns (final state, converged, iterations).
    """
    m = state.shape[1]
    r_scale = 1.0 / float(opt.times.max() - opt.times.min())  # "slow" R on the sampled span
    conv = np.zeros(m, dtype=bool)
    n_iter = np.full(m, it, dtype=np.int16)
    active = np.ones(m, dtype=bool)
    frozen = False  # some voxels converged but stay in this problem: their steps are zeroed
    cap, lower = np.empty(m), np.empty(m)
    lam = None  # Levenberg-Marquardt damping, allocated at the first rejected step
    while True:
        r, step, g = state[_R], state[_STEP], state[_G]
        np.abs(r, out=cap)
        # converged: the next step changes T by less than tol relative (floored at a tenth of
        # the sampled span's rate, so an unmeasurably long T still ends within ~0.05 ms)
        np.maximum(cap, 0.1 * r_scale, out=lower)
        small = np.abs(step) <= np.multiply(lower, opt.tol, out=lower)
        np.maximum(cap, r_scale, out=cap)  # steps are capped to [-cap, cap]
        newly = active if it >= opt.max_iter else (small if not frozen else active & small)
        if newly.any():
            conv |= newly & small
            active &= ~newly
            frozen = True
            n_active = np.count_nonzero(active)
            if n_active == 0:
                break
            if 2 * n_active < m:
                ki = np.flatnonzero(active)
                sub = np.take(state, ki, axis=1)
                sub, c_sub, n_sub = _solve(
                    np.take(y, ki, axis=1), sub, np.empty_like(sub), kern, opt, it
                )
                state[:, ki] = sub
                conv[ki] = c_sub
                n_iter[ki] = n_sub
                break
        n_iter += active
        it += 1
        rt = trial[_R]
        np.negative(cap, out=lower)
        np.clip(step if lam is None else step / (1.0 + lam), lower, cap, out=rt)
        if frozen:
            rt *= active
        rt += r
        kern.reduced(y, trial)
        acc = trial[_G] >= g * (1.0 - 1e-13)  # g >= 0
        if frozen:
            acc |= ~active
        if lam is None and acc.all():
            state, trial = trial, state
            continue
        np.copyto(state, trial, where=acc)
        lam = np.where(acc, 0.0, np.maximum((0.0 if lam is None else lam) * 10.0, 1e-3))
        if not lam.any():
            lam = None
    return state, conv & np.isfinite(state[_G]), n_iter


def _fit_block(y: np.ndarray, opt: _Options, kern: _Kernel) -> dict[str, np.ndarray]:
    """Fit one block ``y`` of shape (n_times, m); every voxel is independent of the others."""
    tk = opt.times
    n, m = y.shape
    reason = np.zeros(m, dtype=np.uint8)
    with np.errstate(all="ignore"):
        r, sy, syy = kern.init(y)
        ss_tot = syy - sy * sy / n
        fittable = (sy > 0) & (ss_tot > 1e-12 * syy)  # NaN / inf signal fails too
        finite = np.isfinite(r)
        if not finite.all():
            r[~finite] = 1.0 / float(tk.max() - tk.min())
        if fittable.all():
            res, trial = kern.states(m)
            res[_R] = r
            kern.reduced(y, res)
            res, conv, n_iter = _solve(y, res, trial, kern, opt, 0)
        else:
            reason[~fittable] = _FLAT
            reason[~(sy > 0)] = _NONPOS
            reason[~np.isfinite(syy)] = _NONFINITE
            res = np.full((kern.rows, m), np.nan)
            conv = np.zeros(m, dtype=bool)
            n_iter = np.zeros(m, dtype=np.int16)
            idx = np.flatnonzero(fittable)
            if idx.size:
                state, trial = kern.states(idx.size)
                state[_R] = r[idx]
                yy = np.take(y, idx, axis=1)
                kern.reduced(yy, state)
                res[:, idx], conv[idx], n_iter[idx] = _solve(yy, state, trial, kern, opt, 0)

        out_r = res[_R]
        out_s0 = res[_S0].copy()  # res may be the kernel's buffer
        out_c = (sy - out_s0 * res[_P0]) / n if opt.offset else None
        ss_res = (ss_tot if opt.offset else syy) - res[_G]
        r2 = 1.0 - np.maximum(ss_res, 0.0) / ss_tot
        t = 1.0 / out_r
        good = conv & (out_r > 0) & (t >= opt.t_lo) & (t <= opt.t_hi) & (out_s0 > 0)
    if not good.all():
        fitted = reason == 0
        reason[fitted & ~conv] = _NOCONV
        reason[fitted & conv & ~(out_r > 0)] = _NODECAY
        ok = reason == 0
        reason[ok & ~((t >= opt.t_lo) & (t <= opt.t_hi))] = _RANGE
        reason[(reason == 0) & ~(out_s0 > 0)] = _S0NEG
        failed = (reason != 0) & (reason != _RANGE) & (reason != _S0NEG)
        for arr in (t, out_s0, r2, *(() if out_c is None else (out_c,))):
            arr[failed] = np.nan
    return {
        "t": t,
        "s0": out_s0,
        "offset": out_c,
        "r2": r2,
        "converged": conv,
        "n_iter": n_iter,
        "reason": reason,
    }


@dataclass
class _Job:
    """One call's voxels, options and output maps; ``fit_chunk(i)`` fits chunk i in place.

    The kernel (work buffers) is created on first use in each process, so forked workers
    build their own and reuse it for all their chunks.
    """

    flat: np.ndarray  # (n_voxels, n_times) signal, any real dtype
    sel: np.ndarray | None  # indices of the voxels to fit (None: all)
    opt: _Options
    out: dict[str, np.ndarray | None]  # (n_voxels,) maps, written chunk by chunk
    chunk_size: int
    n_fit: int
    kernel: _Kernel | None = None

    def fit_chunk(self, i: int) -> int:
        """Fit the i-th chunk of ``chunk_size`` voxels; returns its number of voxels."""
        start = i * self.chunk_size
        stop = min(start + self.chunk_size, self.n_fit)
        where = slice(start, stop) if self.sel is None else self.sel[start:stop]
        if self.kernel is None:
            self.kernel = _Kernel(self.opt, min(self.chunk_size, self.n_fit))
        block = self.kernel.block(stop - start)
        np.copyto(block, self.flat[where].T, casting="unsafe")
        for key, arr in _fit_block(block, self.opt, self.kernel).items():
            if arr is not None:
                self.out[key][where] = arr
        return stop - start


#: a worker costs a fork and its own buffers (~1-2 ms): below this many chunks per worker
#: (~1 ms each) it does not pay
_MIN_CHUNKS_PER_WORKER = 16
#: a worker claims 1/(this x workers) of the chunks left (guided scheduling): few messages
#: at first, single chunks at the end, so the workers finish together even under other load
_CLAIM_DIVISOR = 4


class _WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker process (its ``__cause__`` here)."""


def _n_workers(n_threads: int, n_chunks: int) -> int:
    """Worker processes to use: 1 (serial) when forking is impossible or does not pay."""
    workers = min(n_threads, n_chunks // _MIN_CHUNKS_PER_WORKER)
    if workers <= 1:
        if n_threads > 1:
            _log.debug(
                "%d chunks: fitting serially (a worker needs %d chunks to pay off)",
                n_chunks,
                _MIN_CHUNKS_PER_WORKER,
            )
        return 1
    if "fork" not in multiprocessing.get_all_start_methods():
        _log.warning("n_threads=%d: this platform cannot fork; fitting serially", n_threads)
        return 1
    if multiprocessing.current_process().daemon:
        _log.warning(
            "n_threads=%d: daemonic processes cannot have children; fitting serially", n_threads
        )
        return 1
    return workers


def _shared_empty(n: int, dtype: Any) -> np.ndarray:
    """An (n,) array in anonymous shared memory (MAP_SHARED, zero-filled by the kernel).

    Forked workers write into it and the parent sees the writes; the mapping has no name,
    so nothing can be left behind: it is unmapped when the last process drops it.
    """
    dt = np.dtype(dtype)
    return np.frombuffer(mmap.mmap(-1, max(n * dt.itemsize, 1)), dtype=dt, count=n)


def _run_forked(job: _Job, n_chunks: int, workers: int, progress: Progress | None) -> None:
    """Fit all chunks of ``job`` in ``workers`` forked processes; a worker's error re-raises here.

    Workers claim batches of chunks from a shared counter and report each batch through
    their own pipe: the number of voxels done, then None at the end, or (exception,
    traceback). A worker that dies without a word (killed) shows as end-of-file. On any
    error the other workers are stopped; all are joined before this returns or raises.
    """
    ctx = multiprocessing.get_context("fork")
    claimed = ctx.Value("q", 0)  # chunks handed out so far

    def work(conn: Connection) -> None:  # runs in the forked worker
        try:
            while True:
                with claimed.get_lock():
                    first = claimed.value
                    stop = first + max(1, (n_chunks - first) // (_CLAIM_DIVISOR * workers))
                    claimed.value = stop
                if first >= n_chunks:
                    break
                conn.send(sum(job.fit_chunk(i) for i in range(first, min(stop, n_chunks))))
            conn.send(None)
        except BaseException as err:
            trace = "".join(traceback.format_exception(err))
            try:
                conn.send((err, trace))
            except Exception:  # the exception does not pickle: send its text
                conn.send((RuntimeError(repr(err)), trace))

    procs, pipes, finished = [], [], False
    try:
        for _ in range(workers):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=work, args=(writer,), daemon=True)
            try:
                proc.start()
            except OSError as err:  # e.g. a container's process limit
                raise SpineqprepError(
                    f"cannot start a fitting worker process ({err})",
                    fix="use fewer threads (--omp-nthreads 1) or raise the process limit",
                ) from err
            writer.close()  # the worker holds the only write end: its exit is our end-of-file
            procs.append(proc)
            pipes.append(reader)
        done, running = 0, list(pipes)
        while running:
            for conn in connection.wait(running):
                try:
                    msg = conn.recv()
                except EOFError:
                    raise SpineqprepError(
                        "a fitting worker process died",
                        fix="it was probably killed for lack of memory: use fewer threads "
                        "(--omp-nthreads)",
                    ) from None
                if msg is None:
                    running.remove(conn)
                elif isinstance(msg, tuple):
                    err, trace = msg
                    raise err from _WorkerTraceback(trace)
                else:
                    done += msg
                    if progress is not None:
                        progress(done, job.n_fit)
        finished = True
    finally:
        for proc in procs:
            if not finished:  # an error: the other workers' chunks are moot
                proc.terminate()
            proc.join()
        for conn in pipes:
            conn.close()


def fit_monoexp(
    signal: np.ndarray,
    times: Any,
    *,
    model: Model = "monoexp",
    mask: np.ndarray | None = None,
    t_range: tuple[float, float] = (1e-4, 10.0),
    max_iter: int = 50,
    tol: float = 1e-5,
    n_threads: int = 1,
    chunk_size: int = 8192,
    dtype: type = np.float64,
    progress: Progress | None = None,
) -> MonoexpFit:
    """Fit S(t) = S0 exp(-t/T) (``model="offset"``: + C) to every voxel of ``signal``.

    signal: (..., n_times) array of any real dtype; times: n_times values in seconds.
    mask: boolean array of shape ``signal.shape[:-1]``; voxels outside are not fitted.
    t_range: plausible T (seconds); fitted T outside it are kept but flagged invalid.
    tol: convergence when the next Newton step on R is below ``tol`` x max(|R|, 0.1/time span).
    n_threads: cores to use, as worker processes forked to fit chunks of ``chunk_size``
    voxels (serial when there are fewer than 16 chunks per worker or forking is impossible).
    The results do not depend on it: every worker fits the same chunks the same way. With
    workers the returned maps live in anonymous shared memory (a process forked later
    shares them instead of copying them on write).
    dtype: float dtype of the output maps (the fit itself is float64).
    progress: called as progress(voxels_done, voxels_total) after each chunk (with workers:
    after each batch a worker finishes), in the calling process.
    """
    if model not in ("monoexp", "offset"):
        raise UsageError(f"unknown model {model!r}", fix="use 'monoexp' or 'offset'")
    if n_threads < 1 or chunk_size < 1 or max_iter < 1 or not tol > 0:
        raise UsageError(
            f"n_threads={n_threads}, chunk_size={chunk_size}, max_iter={max_iter}, tol={tol}",
            fix="n_threads, chunk_size and max_iter must be >= 1 and tol > 0",
        )
    lo, hi = (float(v) for v in t_range)
    if not 0 <= lo < hi:
        raise UsageError(f"t_range={t_range} is not an interval", fix="give (low, high) seconds")
    sig = np.asarray(signal)
    if sig.ndim < 1 or not np.issubdtype(sig.dtype, np.number) or np.iscomplexobj(sig):
        raise InputError(f"signal must be a real numeric array, got {sig.dtype} {sig.shape}")
    tk = _check_times(times, sig.shape[-1], model)
    shape = sig.shape[:-1]
    flat = sig.reshape(-1, tk.size)
    n_vox = flat.shape[0]
    if mask is None:
        sel: np.ndarray | None = None
        n_fit = n_vox
    else:
        m = np.asarray(mask)
        if m.shape != shape:
            raise InputError(f"mask shape {m.shape} differs from the image shape {shape}")
        sel = np.flatnonzero(m.reshape(-1))
        n_fit = sel.size
    opt = _Options(tk, model == "offset", int(max_iter), float(tol), lo, hi)
    n_chunks = -(-n_fit // chunk_size)
    workers = _n_workers(n_threads, n_chunks)

    def maps(fill: Any, dt: Any) -> np.ndarray:
        arr = _shared_empty(n_vox, dt) if workers > 1 else np.empty(n_vox, dt)
        if sel is not None:  # voxels outside the mask keep the fill; chunks write all others
            arr.fill(fill)
        return arr

    out = {
        "t": maps(np.nan, dtype),
        "s0": maps(np.nan, dtype),
        "offset": maps(np.nan, dtype) if opt.offset else None,
        "r2": maps(np.nan, dtype),
        "converged": maps(False, bool),
        "n_iter": maps(0, np.int16),
        "reason": maps(_OUTSIDE, np.uint8),
    }
    job = _Job(flat, sel, opt, out, chunk_size, n_fit)
    # the kernel's small matrix products must not spawn BLAS threads: one core per worker
    # (forked workers inherit the limit)
    with threadpool_limits(limits=1, user_api="blas"):
        if workers > 1:
            _run_forked(job, n_chunks, workers, progress)
        else:
            done = 0
            for i in range(n_chunks):
                done += job.fit_chunk(i)
                if progress is not None:
                    progress(done, n_fit)

    reason = out["reason"]
    valid = reason == 0
    n_valid = int(np.count_nonzero(valid))
    failed = reason[~valid] if n_valid < n_vox else reason[:0]  # few voxels, usually
    counts = np.bincount(failed, minlength=len(REASONS))
    summary = {
        "model": model,
        "times_s": tk.tolist(),
        "t_range_s": [lo, hi],
        "n_voxels_fitted": int(n_fit),
        "n_valid": n_valid,
        "fraction_valid": n_valid / n_fit if n_fit else 0.0,
        "reasons": {name: int(c) for name, c in zip(REASONS[1:], counts[1:], strict=True) if c},
        "n_workers": workers,
    }
    return MonoexpFit(
        t=out["t"].reshape(shape),
        s0=out["s0"].reshape(shape),
        offset=None if out["offset"] is None else out["offset"].reshape(shape),
        r2=out["r2"].reshape(shape),
        valid=valid.reshape(shape),
        converged=out["converged"].reshape(shape),
        n_iter=out["n_iter"].reshape(shape),
        reason=reason.reshape(shape),
        summary=summary,
    )
