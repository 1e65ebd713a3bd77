"""`framepack serve`: the HTTP API and its job queue (framepack_engine.serve), one engine per device."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from framepack_engine.commands.common import Signals
from framepack_engine.runtime.attention import available_backends, resolve_backend
from framepack_engine.errors import FramePackError
from framepack_engine.serve.jobs import JobQueue, JobStore, PostprocessFiles, load_worker_engine, parse_devices
from framepack_engine.serve.server import (API_KEY_VARIABLE, DEFAULT_PORT, check_api_key, create_app, default_state_dir, require_server_packages, reserve_port)
from framepack_engine.settings import ModelSettings, add_flags, given_flags, integer, number

MAX_BODY_MB = 100_000  # more than any request needs, and a count of bytes a server can hold


def load_engines(model_settings, preset: str | None, devices: list[str]) -> list[tuple[str, object]]:
    """One engine per device, loaded side by side."""
    engines: list = [None] * len(devices)
    errors: list = []

    def load(index, device):
        try:
            engines[index] = (device, load_worker_engine(model_settings, preset, device))
        except BaseException as error:  # handed to the main thread, which reports it
            errors.append(error)

    threads = [threading.Thread(target=load, args=(index, device)) for index, device in enumerate(devices)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return engines


def add_serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="HTTP API with a persistent job queue",
                                description="Serve the engine over HTTP: queue generations, follow them with "
                                            "Server-Sent Events, download their videos. API docs at /docs.")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other "
                                                           "needs --api-key)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--state-dir", help="where the job queue, inputs and outputs live "
                                           "(default $XDG_STATE_HOME/framepack or ~/.local/state/framepack)")
    serve.add_argument("--devices", help="one worker per device: CUDA indices such as 0,1, or cpu "
                                         "(default: the first CUDA device, else cpu)")
    serve.add_argument("--api-key", help=f"every request must send it (default ${API_KEY_VARIABLE}); needed to bind "
                                         "a non-loopback address")
    serve.add_argument("--max-queued", type=int, default=256, help="waiting jobs beyond this are refused with 429 "
                                                                  "(default 256)")
    serve.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body, uploads included, "
                                                                      "in MiB (default 32)")
    serve.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn's log level (default warning; info logs every request)")
    models = serve.add_argument_group("model (as framepack generate)")
    models.add_argument("--preset", choices=["tiny"], help="a random-weight model built in memory (its video is noise)")
    add_flags(models, ModelSettings, skip=("device",))
    post = serve.add_argument_group("after generation (jobs ask for them; they never send paths)")
    post.add_argument("--rife-model", metavar="SAFETENSORS", help="RIFE 4.x weights for jobs' interpolate "
                      "(framepack convert-rife makes them from Practical-RIFE's flownet.pkl)")
    post.add_argument("--upscaler", metavar="MODEL", action="append", help="an upscaler's weights (.safetensors or "
                      ".pth) that jobs may name by its file name in upscale; repeat for several")
    serve.set_defaults(run=command_serve)


def command_serve(args) -> int:
    signals = getattr(args, "signals", None) or Signals()  # main()'s, installed for the whole command
    # Everything that can be wrong is checked before the model loads.
    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    check_api_key(args.host, api_key)
    # The server's own options through the settings' checks (NaN, infinities and out-of-range values refused).
    integer(1, 65535)("--port", args.port)
    integer(1)("--max-queued", args.max_queued)
    number(0, MAX_BODY_MB, low_open=True, fix="e.g. 32")("--max-body-mb", args.max_body_mb)
    model_settings = ModelSettings.from_options(**given_flags(args, ModelSettings, skip=("device",)))
    files = _postprocess_files(args.rife_model, args.upscaler or [])
    devices = parse_devices(args.devices)
    require_server_packages()
    import uvicorn

    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir()
    store = JobStore(state_dir)
    sock = reserve_port(args.host, args.port)
    try:
        engines = load_engines(model_settings, args.preset, devices)
        queue = JobQueue(store, engines, args.max_queued, abort=signals.abort, files=files)
        engine = queue.engine
        info = {"engine": "framepack-engine", "model": engine.name, "variant": engine.variant,
                "dtype": str(engine.dtype).removeprefix("torch."), "devices": devices,
                "attention": resolve_backend(model_settings.attention, devices[0]).name,
                "backends": available_backends(devices[0]),
                # The LoRAs every job runs with (fixed at start-up), by name: the files' paths stay private.
                "loras": [{"name": lora["name"], "strength": lora["strength"]}
                          for lora in engine.loras.describe()],
                # What jobs may ask for after generation (interpolate, upscale): names only, like the LoRAs.
                **files.info()}
        app = create_app(queue, api_key=api_key, max_body_bytes=int(args.max_body_mb * 2**20), info=info)
        for job_id, happened in queue.start():
            print(f"job {job_id}: {happened}", flush=True)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"Serving {engine.name} on http://{host}:{args.port} (open it in a browser; API docs: /docs) with "
              f"{len(devices)} worker(s).", flush=True)
        server = _uvicorn_server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=3), signals)
        try:
            server.run(sockets=[sock])
        finally:
            with signals.deferred():  # the workers finish their videos (a second signal: only what is durable)
                queue.stop()  # the app's shutdown did it unless the server failed or a second Ctrl-C cut it short
    finally:
        sock.close()
        store.close()
    return signals.status if signals.interrupted else 0


def _postprocess_files(rife_model: str | None, upscalers: list[str]) -> PostprocessFiles:
    """The server's interpolation and upscaling weights, checked before anything loads (one line each): existing
    files, spandrel importable, upscalers with distinct file names (jobs name them)."""
    from framepack_engine.models.rife import check_rife_path
    from framepack_engine.models.upscaler import check_upscaler_path, import_spandrel

    if rife_model is not None:
        check_rife_path(rife_model)
    for path in upscalers:
        check_upscaler_path(path)
    if upscalers:
        import_spandrel()
    names = [Path(path).name for path in upscalers]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise FramePackError(f"Two --upscaler files are named {twice!r}: jobs name upscalers by their file name, so "
                             "give each a different one.")
    return PostprocessFiles(rife_model, tuple(upscalers))


def _uvicorn_server(config, signals: Signals):
    """uvicorn's server, whose signal handler also counts the signals for the finishing protocol: a second one,
    while the running jobs finish their videos, makes them keep only what is durable. The command says the
    interruption in its exit status (130 / 143), so uvicorn need not raise the signal again once it is done."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            signals.note(sig)
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured.clear()

    return Server(config)
