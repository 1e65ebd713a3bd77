"""The server's persistent job queue: jobs kept in SQLite in a state directory, run by one worker per device.

Nothing here speaks HTTP (engine/server.py does); this module owns the jobs. The state directory holds:

    jobs.sqlite3                  one row per job: state, settings, progress by section, stats, error
    server.lock                   locked by the server using the directory, so a second one is refused
    jobs/<id>/settings.json       what was asked: the generation settings and the output format
    jobs/<id>/image.<ext>         uploaded images as they came (checked when submitted, read by the engine's reader)
    jobs/<id>/video.<format>      the output: after each section a complete file of every finished section
    jobs/<id>/resume/             while the job runs: the last section's checkpoint and each section's final frames

Jobs run in submission order. A job that was running when the server stopped (killed or shut down) is queued again
at start-up and goes on after its last finished section (framepack_engine.pipeline.SectionCheckpoint); one that stopped the
server `MAX_ATTEMPTS` times, or whose checkpoint belongs to another model (or other LoRAs), fails with a message
saying why.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sqlite3
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from framepack_engine.errors import FramePackError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so nothing stops a second server on one state directory there
    fcntl = None

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED_STATES = ("done", "failed", "cancelled")
# A job that was running each time the server stopped this often is taken to be what stops it.
MAX_ATTEMPTS = 3
# The containers a job can ask for (each written with its default encoder: H.264, or VP9 for webm).
OUTPUT_FORMATS = ("mp4", "mkv", "mov", "webm")
IMAGE_OUTPUT_FORMATS = ("png", "jpg", "webp")  # a one-frame job's (its settings in the PNG's text chunk)
INPUT_IMAGES = ("image", "end_image")
# Inputs a job may hold several of, each stored as NAME_KEY: keyframe_SPEC (e.g. keyframe_-1), control_image_N and
# control_mask_N (N from 1, in the order given).
KEYFRAME_PREFIX, CONTROL_IMAGE_PREFIX, CONTROL_MASK_PREFIX = "keyframe_", "control_image_", "control_mask_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    settings TEXT NOT NULL,                 -- JSON: checked GenerationSettings
    output TEXT NOT NULL,                   -- JSON: format, crf
    inputs TEXT NOT NULL,                   -- JSON: input name -> file name in the job's folder
    sections INTEGER NOT NULL,
    sections_done INTEGER NOT NULL DEFAULT 0,
    frames INTEGER NOT NULL DEFAULT 0,
    stats TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    device TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    submitted_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
"""


def request_inputs(folder: Path, inputs: dict[str, str]) -> dict:
    """resolve_request's input keywords from a job's stored inputs (name -> file in `folder`)."""
    paths = {name: str(folder / file) for name, file in inputs.items()}

    def numbered(prefix: str) -> list | None:
        found = {int(name[len(prefix):]): path for name, path in paths.items() if name.startswith(prefix)}
        return [found.get(number) for number in range(1, max(found) + 1)] if found else None

    keyframes = {name[len(KEYFRAME_PREFIX):]: path for name, path in paths.items() if name.startswith(KEYFRAME_PREFIX)}
    return {"image": paths.get("image"), "end_image": paths.get("end_image"), "keyframes": keyframes or None,
            "control_images": numbered(CONTROL_IMAGE_PREFIX), "control_masks": numbered(CONTROL_MASK_PREFIX)}


class QueueFull(FramePackError):
    """The server holds its maximum of queued jobs."""


class JobNotFound(FramePackError):
    """No job has this id."""


class JobFinished(FramePackError):
    """The job is done, failed or cancelled already."""


def is_job_id(text: str) -> bool:
    """Job ids are 16 lowercase hex digits; anything else never reaches the file system."""
    return len(text) == 16 and all(c in "0123456789abcdef" for c in text)


@dataclass
class Job:
    """One row of the queue, as the HTTP layer shows it."""

    id: str
    seq: int
    state: str
    settings: dict
    output: dict
    inputs: dict
    sections: int
    sections_done: int
    frames: int
    stats: dict
    error: str | None
    device: str | None
    attempts: int
    cancel_requested: bool
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    position: int | None = None  # queued jobs ahead of it (0: next to start); None unless queued

    @property
    def video_name(self) -> str:
        return f"video.{self.output['format']}"


class JobStore:
    """The jobs table and the jobs' folders. Safe to use from any thread (one connection behind a lock)."""

    def __init__(self, state_dir):
        self.state_dir = Path(state_dir)
        try:
            (self.state_dir / "jobs").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise FramePackError(f"Cannot create the state directory ({error.strerror}): choose a writable "
                                 "--state-dir.") from None
        self._owner = self._own(self.state_dir)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.state_dir / "jobs.sqlite3", check_same_thread=False,
                                       isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as error:
            self._disown()
            raise FramePackError(f"The state directory's jobs.sqlite3 cannot be used ({error}): move it away or "
                                 "choose another --state-dir.") from None
        # Bumped on every change of any job, so watchers know when to read again.
        self.changes = 0

    @staticmethod
    def _own(state_dir: Path):
        """The open lock file that makes this store the state directory's only user (None where locks do not
        exist). Two servers on one directory would each run the other's jobs: the second is refused."""
        if fcntl is None:
            return None
        try:
            owner = open(state_dir / "server.lock", "a")
        except OSError as error:
            raise FramePackError(f"Cannot write in the state directory ({error.strerror}): choose a writable "
                                 "--state-dir.") from None
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner.close()
            raise FramePackError("Another framepack serve is using this state directory: stop it, or give this "
                                 "server another --state-dir.") from None
        return owner

    def _disown(self) -> None:
        if self._owner is not None:
            self._owner.close()  # closing the lock file releases the lock
            self._owner = None

    def folder(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._disown()

    # ---- reading ----------------------------------------------------------------------------------------------

    def _job(self, row) -> Job:
        return Job(row["id"], row["seq"], row["state"], json.loads(row["settings"]), json.loads(row["output"]),
                   json.loads(row["inputs"]), row["sections"], row["sections_done"], row["frames"],
                   json.loads(row["stats"]), row["error"], row["device"], row["attempts"],
                   bool(row["cancel_requested"]), row["submitted_at"], row["started_at"], row["finished_at"])

    def get(self, job_id: str) -> Job:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone() \
                if is_job_id(job_id) else None
            if row is None:
                raise JobNotFound(f"No job has the id {job_id!r}: list the jobs with GET /v1/jobs.")
            job = self._job(row)
            if job.state == "queued":
                job.position = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?",
                                                (job.seq,)).fetchone()[0]
        return job

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        """The most recent `limit` jobs (of one state if given), in submission order."""
        with self._lock:
            where, arguments = ("WHERE state = ?", (state,)) if state else ("", ())
            rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ?",
                                    (*arguments, limit)).fetchall()
            queued = [row[0] for row in self._db.execute("SELECT seq FROM jobs WHERE state = 'queued' ORDER BY seq")]
        positions = {seq: index for index, seq in enumerate(queued)}
        jobs = [self._job(row) for row in reversed(rows)]
        for job in jobs:
            job.position = positions.get(job.seq)
        return jobs

    def counts(self) -> dict[str, int]:
        with self._lock:
            found = dict(self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
        return {state: found.get(state, 0) for state in JOB_STATES}

    # ---- changing ---------------------------------------------------------------------------------------------

    def _update(self, job_id: str, **values) -> None:
        assignments = ", ".join(f"{name} = ?" for name in values)
        self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", (*values.values(), job_id))
        self.changes += 1

    def submit(self, settings: dict, output: dict, images: dict[str, tuple[str, bytes]], sections: int,
               max_queued: int) -> Job:
        """A new queued job; images: input name -> (file suffix, bytes). Raises QueueFull beyond max_queued."""
        job_id = secrets.token_hex(8)
        folder = self.folder(job_id)
        folder.mkdir(parents=True)
        inputs = {}
        for name, (suffix, data) in images.items():
            inputs[name] = f"{name}{suffix}"
            (folder / inputs[name]).write_bytes(data)
        (folder / "settings.json").write_text(json.dumps({"settings": settings, "output": output}, indent=2))
        with self._lock:
            queued = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
            if queued >= max_queued:
                shutil.rmtree(folder, ignore_errors=True)
                raise QueueFull(f"The queue is full ({queued} jobs waiting, the most this server takes): submit "
                                "again when some have finished.")
            self._db.execute(
                "INSERT INTO jobs (id, state, settings, output, inputs, sections, submitted_at) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, json.dumps(settings), json.dumps(output), json.dumps(inputs), sections, time.time()))
            self.changes += 1
        return self.get(job_id)

    def claim(self, device: str) -> Job | None:
        """The oldest queued job, now running on `device` (None when nothing waits)."""
        with self._lock:
            while True:
                row = self._db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
                if row is None:
                    return None
                # Only while still queued: what else writes the database (another process) may have taken it.
                claimed = self._db.execute(
                    "UPDATE jobs SET state = 'running', device = ?, attempts = attempts + 1, "
                    "started_at = COALESCE(started_at, ?) WHERE id = ? AND state = 'queued'",
                    (device, time.time(), row["id"])).rowcount
                if claimed:
                    break
            self.changes += 1
        return self.get(row["id"])

    def section_finished(self, job_id: str, sections_done: int, frames: int, stats: dict) -> None:
        with self._lock:
            self._update(job_id, sections_done=sections_done, frames=frames, stats=json.dumps(stats))

    def finish(self, job_id: str, state: str, error: str | None = None, frames: int | None = None) -> None:
        assert state in FINISHED_STATES
        with self._lock:
            self._update(job_id, state=state, error=error, finished_at=time.time(),
                         **({} if frames is None else {"frames": frames}))

    def requeue(self, job_id: str, frames: int) -> None:
        """Back in the queue at its place (a shutdown interrupted it; its checkpoint stays). A shutdown does not
        count as an attempt: only runs the server did not come back from do."""
        with self._lock:
            self._db.execute("UPDATE jobs SET state = 'queued', attempts = attempts - 1, frames = ? WHERE id = ?",
                             (frames, job_id))
            self.changes += 1

    def request_cancel(self, job_id: str) -> Job:
        """A queued job is cancelled at once; a running one is marked (its worker stops at the next step)."""
        with self._lock:
            # Each change only from the state it is meant for, so a worker claiming the job meanwhile is no matter.
            cancelled = self._db.execute("UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ? "
                                         "WHERE id = ? AND state = 'queued'", (time.time(), job_id)).rowcount
            marked = cancelled or self._db.execute("UPDATE jobs SET cancel_requested = 1 "
                                                   "WHERE id = ? AND state = 'running'", (job_id,)).rowcount
            if marked:
                self.changes += 1
        if cancelled:  # a job requeued by a shutdown kept the raw frames of its finished sections
            ResumeFiles(self.folder(job_id) / "resume").remove()
        job = self.get(job_id)  # raises JobNotFound
        if not marked:  # finished: no state leads back from there, so what get() read is still true
            raise JobFinished(f"Job {job_id} is {job.state} already: there is nothing to cancel.")
        return job

    def remove(self, job_id: str) -> bool:
        """Forgets a finished job: its row, inputs and video. False (nothing changed) while it is queued or running;
        JobNotFound when no job has the id."""
        self.get(job_id)  # raises JobNotFound
        with self._lock:
            finished = ", ".join("?" * len(FINISHED_STATES))
            removed = self._db.execute(f"DELETE FROM jobs WHERE id = ? AND state IN ({finished})",
                                       (job_id, *FINISHED_STATES)).rowcount
            if removed:
                self.changes += 1
        if removed:
            shutil.rmtree(self.folder(job_id), ignore_errors=True)
        return bool(removed)

    def recover(self) -> list[tuple[str, str]]:
        """At start-up: every job left running by a stopped server is queued again (or cancelled or failed, with
        the reason). Returns (job id, what happened) for each."""
        happened, finished = [], []
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY seq").fetchall()
            for row in rows:
                job = self._job(row)
                if job.cancel_requested:
                    self._update(job.id, state="cancelled", finished_at=time.time())
                    happened.append((job.id, "cancelled (as asked before the server stopped)"))
                    finished.append(job.id)
                elif job.attempts >= MAX_ATTEMPTS:
                    self._update(job.id, state="failed", finished_at=time.time(), error=(
                        f"The server stopped {job.attempts} times while running this job, so it is not run again "
                        f"(it may be what stops the server, e.g. by running out of memory): its "
                        f"{job.sections_done} finished sections are kept; submit it again with lighter settings."))
                    happened.append((job.id, "failed"))
                    finished.append(job.id)
                else:
                    self._update(job.id, state="queued")
                    happened.append((job.id, f"queued again after {job.sections_done} finished sections"))
        for job_id in finished:  # never resumed: its video keeps the finished sections, the raw frames can go
            ResumeFiles(self.folder(job_id) / "resume").remove()
        return happened


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints: what a restarted server needs to go on after a job's last finished section
# --------------------------------------------------------------------------------------------------------------------


class ResumeFiles:
    """A running job's resume folder: each section's final frames (written once) and the last checkpoint."""

    def __init__(self, folder: Path):
        self.folder = folder

    def save(self, result) -> None:
        """After a section: its frames first, then the checkpoint that counts them (so a crash between the two
        leaves the older, consistent checkpoint)."""
        import torch
        from safetensors.torch import save_file

        from framepack_engine.media.video import atomic_path

        self.folder.mkdir(exist_ok=True)
        # Written whole or not at all: a crash leaves the old file or the new one, and a failed write no temporary.
        with atomic_path(self.folder / f"frames_{result.index:05d}.npy") as temporary:
            with open(temporary, "wb") as file:
                np.save(file, result.frames)
        tensors = result.checkpoint.tensors()
        tensors["pending_frames"] = torch.from_numpy(np.ascontiguousarray(result.pending_frames))
        metadata = {"model": str(result.metadata.get("model")), "variant": str(result.metadata.get("variant")),
                    "count": str(result.count), "video_position": str(result.video_position),
                    "direction": result.direction, "metadata": json.dumps(result.metadata)}
        with atomic_path(self.folder / "checkpoint.safetensors") as temporary:
            save_file(tensors, str(temporary), metadata=metadata)

    def load(self, engine, sections: int):
        """(checkpoint, replays), or (None, []) when there is none. replays: one result per finished section, in
        generation order, holding that section's final frames (the last one also the frames still pending a
        crossfade): handed to the output one by one, they are encoded segment for segment as the uninterrupted run
        encoded them, so the resumed job's video is the one an uninterrupted run makes. Raises FramePackError when
        the checkpoint belongs to another model or another plan."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from framepack_engine.pipeline import SectionCheckpoint, SectionResult

        path = self.folder / "checkpoint.safetensors"
        if not path.exists():
            return None, []
        with safe_open(str(path), "pt") as opened:
            metadata = opened.metadata()
        tensors = load_file(str(path))
        checkpoint = SectionCheckpoint.from_tensors(tensors)
        if (metadata["model"], metadata["variant"]) != (engine.name, engine.variant):
            raise FramePackError(
                f"This job's finished sections were made by {metadata['model']} ({metadata['variant']}) and this "
                f"server runs {engine.name} ({engine.variant}): they cannot be continued; submit the job again.")
        recorded = json.loads(metadata["metadata"])
        made_with, running = _lora_strengths(recorded.get("loras", [])), _lora_strengths(engine.loras.describe())
        if made_with != running:
            raise FramePackError(
                f"This job's finished sections were made with {_lora_text(made_with)} and this server runs "
                f"{_lora_text(running)}: they cannot be continued; start the server with the job's --lora options, "
                "or submit the job again.")
        if int(metadata["count"]) != sections:
            raise FramePackError("This job's checkpoint does not match its settings: submit the job again.")
        done, direction = checkpoint.sections_done, metadata["direction"]
        pending = tensors["pending_frames"].numpy()
        replays = []
        for index in range(done):
            last = index == done - 1
            frames = np.load(self.folder / f"frames_{index:05d}.npy")
            position = int(metadata["video_position"]) if last else \
                index if direction == "forward" else sections - 1 - index
            replays.append(SectionResult(index, sections, position, frames, pending if last else pending[:0],
                                         direction, None, {}, recorded, checkpoint if last else None))
        return checkpoint, replays

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _lora_strengths(described: list[dict]) -> list[tuple[str, float]]:
    """What of the LoRAs (as LoraSet.describe() and output metadata give them) makes the model: each file and its
    strength, sorted since they add up. Fused or live runs the same model, so the mode is left out."""
    return sorted((lora["file"], float(lora["strength"])) for lora in described)


def _lora_text(loras: list[tuple[str, float]]) -> str:
    return "the LoRAs " + ", ".join(f"{file}:{strength:g}" for file, strength in loras) if loras else "no LoRA"


# --------------------------------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class LiveJob:
    """A running job's progress, kept in memory and updated at every sampler step."""

    cancel: threading.Event = field(default_factory=threading.Event)
    progress: dict = field(default_factory=dict)
    # (version, progress) of the recent updates, so a watcher that looks between steps misses none of them.
    recent: deque = field(default_factory=lambda: deque(maxlen=256))
    preview: object = None  # the latest uint8 (T, H, W, 3) latent preview tensor
    preview_version: int = 0
    version: int = 0


def load_worker_engine(model_settings, preset: str | None, device: str):
    """The engine one worker runs: the one `framepack generate` builds from the same options, on `device`."""
    from framepack_engine.pipeline import Engine
    from framepack_engine.settings import ModelSettings

    engine = Engine.from_settings(ModelSettings.from_options(**{**model_settings.as_dict(), "device": device}), preset)
    if engine.notice:  # said once at start-up, not at every job
        print(engine.notice, flush=True)
        engine.notice = None
    return engine


class Worker(threading.Thread):
    """Runs queued jobs one at a time on its own engine."""

    def __init__(self, queue: "JobQueue", device: str, engine):
        super().__init__(name=f"framepack-worker-{device}", daemon=True)
        self.queue, self.device, self.engine = queue, device, engine
        self.job_id: str | None = None

    def run(self):
        while not self.queue.stopping.is_set():
            job = self.queue.store.claim(self.device)
            if job is None:
                self.queue.wait_for_work()
                continue
            self.job_id = job.id
            self.queue.live[job.id] = LiveJob()
            try:
                self.run_job(job)
            except Exception:  # the store itself failed (disk full?): say so, and keep serving
                traceback.print_exc()
            finally:
                self.job_id = None
                self.queue.live.pop(job.id, None)

    def run_job(self, job: Job) -> None:
        from framepack_engine.media.output import SectionOutputFile
        from framepack_engine.media.still import StillOutputFile
        from framepack_engine.resolve import resolve_request
        from framepack_engine.settings import GenerationSettings

        store, live = self.queue.store, self.queue.live[job.id]
        # Read again now that the live entry exists: a cancel that came after the claim but found no entry to
        # signal is in the store.
        if store.get(job.id).cancel_requested:
            live.cancel.set()
        folder = store.folder(job.id)
        for leftover in folder.glob(f".{job.video_name}.*"):  # a killed writer's temporary files and parts
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        resume_files = ResumeFiles(folder / "resume")
        if job.settings.get("one_frame"):  # one image (framepack_engine.generation.one_frame)
            output = StillOutputFile(folder / job.video_name)
        else:
            output = SectionOutputFile(folder / job.video_name, job.settings.get("fps", 30.0), crf=job.output["crf"])
        stats = dict(job.stats)
        done, state, error = 0, None, None
        try:
            settings = GenerationSettings.from_options(**self.queue.files.settings(job.settings))
            # interpolation and upscaling, on each section (a one-frame image is only upscaled)
            wanted = settings.interpolate > 1 or settings.upscale is not None
            output.set_postprocess(self.engine.postprocess(settings) if wanted else None, settings.output_fps,
                                   self.queue.files.recorded(settings.as_dict()))
            request = resolve_request(settings, self.engine.variant,
                                      **request_inputs(folder, job.inputs),
                                      default_resolution=self.engine.default_resolution)
            checkpoint, replays = resume_files.load(self.engine, job.sections)
            for replay in replays:  # a segment per finished section, as they were first encoded
                output.add(replay)
            if checkpoint is not None:
                done = stats["resumed_from"] = checkpoint.sections_done
            progress = _ProgressClock(live, job, stats, done, request.settings.steps)
            for result in self.engine.stream(
                    request=request, callback=progress.step,
                    cancel=lambda: live.cancel.is_set() or self.queue.stopping.is_set(), resume=checkpoint):
                if result.index + 1 < result.count:
                    resume_files.save(result)
                output.add(result)  # encoded in the background while the next section samples
                done = result.index + 1
                stats.setdefault("sections", []).append(result.stats)
                stats["seconds"] = sum(section["seconds"] for section in stats["sections"])
                store.section_finished(job.id, done, output.frame_count, stats)
        except FramePackError as problem:
            state, error = "failed", str(problem)
        except Exception as problem:  # an engine bug or an out-of-memory: the job fails, the server goes on
            traceback.print_exc()
            state, error = "failed", f"The engine failed: {type(problem).__name__}: {problem}"
        else:
            if done == job.sections:
                state = "done"
            elif live.cancel.is_set():
                state = "cancelled"
        closing_error = self._close(output, self.queue.abort)
        if closing_error is not None and state in ("done", "cancelled"):  # its video is not what it says
            state, error = "failed", closing_error
        frames = output.frames_written
        if state is None:  # the server is shutting down: the job goes on after its last finished section next time
            store.requeue(job.id, frames)
            print(f"job {job.id}: stopped after {done} of {job.sections} sections, back in the queue (it goes on "
                  f"after them at the next start): {output.on_disk()}.", flush=True)
            return
        resume_files.remove()
        store.finish(job.id, state, error, frames)

    @staticmethod
    def _close(output, abort: threading.Event | None = None) -> str | None:
        """Ends the file with every finished frame (the last section's pending ones as they are), or, once `abort`
        is set, with what is durable (the finishing protocol, framepack_engine.media.output). Returns None, or the
        one-line error when the encoder failed (the file then keeps what it had published)."""
        try:
            output.close(stop=abort)
        except FramePackError as problem:
            output.abort()
            return str(problem)
        except Exception as problem:
            output.abort()
            return (f"Finishing the video failed ({type(problem).__name__}: {problem}): {output.on_disk()}; check "
                    "free disk space and submit the job again.")
        return None


class _ProgressClock:
    """Turns the engine's per-step callback into "section i of n, step j of m, seconds, what is left"."""

    def __init__(self, live: LiveJob, job: Job, stats: dict, sections_done: int, steps: int):
        self.live, self.sections = live, job.sections
        self.start = time.perf_counter()
        self.earlier_seconds = stats.get("seconds", 0.0)  # a resumed job's finished sections
        self.steps_done = 0
        self._publish({"section": sections_done + 1, "step": 0, "steps": steps, "seconds": self.earlier_seconds,
                       "eta_seconds": None})

    def step(self, info: dict) -> None:
        steps, section = info["total_steps"], info["section"]
        self.steps_done += 1
        elapsed = time.perf_counter() - self.start
        steps_left = (self.sections - section - 1) * steps + steps - info["i"] - 1
        if info.get("preview") is not None:
            self.live.preview = info["preview"]
            self.live.preview_version += 1
        self._publish({"section": section + 1, "step": info["i"] + 1, "steps": steps,
                       "seconds": self.earlier_seconds + elapsed,
                       "eta_seconds": elapsed / self.steps_done * steps_left})

    def _publish(self, progress: dict) -> None:
        self.live.progress = progress
        self.live.version += 1
        self.live.recent.append((self.live.version, progress))


@dataclass(frozen=True)
class PostprocessFiles:
    """The interpolation and upscaling weights a server offers, set when it starts (framepack serve --rife-model,
    --upscaler): a job never sends a path; it asks for `interpolate` (the server's RIFE model) and names an upscaler
    by its file name (`upscale`, listed in /v1/info). Its jobs and outputs record those names, never the folders."""

    rife_model: str | None = None
    upscalers: tuple[str, ...] = ()

    def names(self) -> dict[str, str]:
        return {Path(path).name: path for path in self.upscalers}

    def settings(self, given: dict) -> dict:
        """A job's settings with the server's files put in: the upscaler's name becomes its path, and the server's
        RIFE model goes with `interpolate` > 1; one line naming what this server lacks."""
        settings = dict(given)
        name = settings.get("upscale")
        if name is not None:
            if name not in self.names():
                offered = ", ".join(sorted(self.names())) or "none (framepack serve --upscaler MODEL offers one)"
                raise FramePackError(f"upscale names one of the server's upscalers, and {str(name)!r} is none of "
                                     f"them: the server has {offered}.")
            settings["upscale"] = self.names()[name]
        interpolate = settings.get("interpolate")
        if isinstance(interpolate, (int, float)) and not isinstance(interpolate, bool) and interpolate > 1:
            if self.rife_model is None:
                raise FramePackError("interpolate needs RIFE weights, and this server has none: they are set when it "
                                     "starts (framepack serve --rife-model rife.safetensors).")
            settings["rife_model"] = self.rife_model
        return settings

    def stored(self, settings: dict) -> dict:
        """A job's checked settings as the queue keeps them (and a retry sends them back): the upscaler by its name,
        no RIFE path (it comes with interpolate)."""
        stored = {name: value for name, value in settings.items() if name != "rife_model"}
        if stored.get("upscale") is not None:
            stored["upscale"] = Path(stored["upscale"]).name
        return stored

    @staticmethod
    def recorded(settings: dict) -> dict:
        """What an output's metadata records of these files in place of their paths: their names."""
        return {name: Path(settings[name]).name for name in ("rife_model", "upscale") if settings.get(name)}

    def info(self) -> dict:
        """For /v1/info: whether jobs may interpolate (the RIFE weights' name) and the upscalers' names."""
        return {"rife_model": Path(self.rife_model).name if self.rife_model else None,
                "upscalers": sorted(self.names())}


class JobQueue:
    """The store, the workers and the running jobs' live progress."""

    def __init__(self, store: JobStore, engines: list[tuple[str, object]], max_queued: int,
                 abort: threading.Event | None = None, files: PostprocessFiles | None = None):
        """engines: (device, engine) for each worker. abort: set (by a second signal, framepack_engine.commands.
        common.Signals) while the workers finish their videos at a stop: they then keep only what is durable.
        files: the interpolation and upscaling weights jobs may use."""
        self.store, self.max_queued = store, max_queued
        self.files = files or PostprocessFiles()
        self.live: dict[str, LiveJob] = {}
        self.stopping = threading.Event()
        self.abort = abort if abort is not None else threading.Event()
        self._work = threading.Condition()
        self.workers = [Worker(self, device, engine) for device, engine in engines]

    @property
    def engine(self):
        """The first worker's engine (they all load the same model)."""
        return self.workers[0].engine

    def start(self) -> list[tuple[str, str]]:
        recovered = self.store.recover()
        for worker in self.workers:
            worker.start()
        return recovered

    def stop(self, timeout: float = 60.0) -> None:
        """Running jobs stop at their next step and go back to the queue; the workers end."""
        self.stopping.set()
        self.notify()
        for worker in self.workers:
            if worker.is_alive():
                worker.join(timeout)

    def notify(self) -> None:
        with self._work:
            self._work.notify_all()

    def wait_for_work(self, timeout: float = 1.0) -> None:
        with self._work:
            self._work.wait(timeout)

    def submit(self, settings: dict, output: dict, images: dict, sections: int) -> Job:
        job = self.store.submit(settings, output, images, sections, self.max_queued)
        self.notify()
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.store.request_cancel(job_id)
        live = self.live.get(job_id)
        if live is not None:
            live.cancel.set()
        return job


def parse_devices(text: str | None) -> list[str]:
    """--devices: "0,1" (CUDA indices), "cuda:1", "cpu"; default: the first CUDA device, else the CPU."""
    import torch

    if not text:
        return ["cuda:0" if torch.cuda.is_available() else "cpu"]
    devices = []
    for part in (piece.strip() for piece in text.split(",")):
        name = f"cuda:{part}" if part.isdigit() else part
        if name == "cuda":
            name = "cuda:0"
        if name != "cpu" and not (name.startswith("cuda:") and name[5:].isdigit()):
            raise FramePackError(f"Unknown device {part!r} in --devices: use CUDA indices (0,1), cuda:N or cpu.")
        if name != "cpu" and int(name[5:]) >= torch.cuda.device_count():
            raise FramePackError(f"--devices names {name}, but torch sees {torch.cuda.device_count()} CUDA devices "
                                 "here: list ones that exist, or cpu.")
        devices.append(name)
    return devices
