"""A memory plan applied to models: what stays on the device, what streams, what visits the device in turn.

Works on any models that look like the engine's (a DiT with `blocks` and `set_block_stream`, a text encoder with
`llama_model`/`clip_model`, an image encoder with `model`, a VAE module); it imports no model class.
"""

from __future__ import annotations

import contextlib

import torch

from framepack_engine.runtime.offload import BlockStreamer, ModuleHome
from framepack_engine.runtime.planner import Footprint, MemoryPlan, plan_memory


class DiTPlacement:
    """A plan applied to the DiT: its non-block modules and resident blocks on the device, the rest streaming."""

    def __init__(self, dit, plan: MemoryPlan, device):
        self.dit, self.plan = dit, plan
        self.home = ModuleHome(dit, device, skip=dit.blocks)
        self.home.to_device()
        self.streamer = BlockStreamer(dit.blocks, device, plan.streamed_blocks, prefetch=max(plan.prefetch, 1),
                                      pinned=plan.source == "pinned", keep=dit.modules_used_outside_blocks())
        dit.set_block_stream(self.streamer)

    def close(self) -> None:
        """Every DiT tensor back on the host (as loaded) and the plain block loop back in place."""
        self.dit.set_block_stream(None)
        self.streamer.close()
        self.home.to_host()


class Placement:
    """A memory plan applied to an engine's models; `use(name)` brings a model onto the device for its phase.

    footprint and host_ram_bytes (what the plan was made from) let `fit` plan again for a larger section.
    """

    def __init__(self, plan: MemoryPlan, device, dit, text_encoder=None, image_encoder=None, vae=None,
                 encoder_dtype: torch.dtype | None = None, footprint: Footprint | None = None,
                 host_ram_bytes: int | None = None):
        self.device = torch.device(device)
        self.encoder_dtype = encoder_dtype
        self.footprint, self.host_ram_bytes = footprint, host_ram_bytes
        self.models = {"transformer": dit, "text_encoder": text_encoder, "image_encoder": image_encoder, "vae": vae}
        self._place(plan)

    def _place(self, plan: MemoryPlan) -> None:
        self.plan = plan
        device, dtype, models = self.device, self.encoder_dtype, self.models
        self.dit = DiTPlacement(models["transformer"], plan, device) if models["transformer"] is not None else None
        self._homes: dict[str, list[ModuleHome]] = {}
        self._streamers: dict[str, BlockStreamer] = {}
        self._hooks = []
        self._in_use: set[str] = set()
        text_encoder = models["text_encoder"]
        if text_encoder is not None and getattr(text_encoder, "llama_model", None) is not None:
            llama, clip = text_encoder.llama_model, text_encoder.clip_model
            if plan.placements.get("text_encoder") == "stream":
                self._homes["text_encoder"] = [ModuleHome(llama, device, dtype, skip=[llama.layers]),
                                               ModuleHome(clip, device, dtype)]
                streamer = BlockStreamer(llama.layers, device, prefetch=1, dtype=dtype, allocate=False)
                self._hooks = streamer.attach_hooks()
                self._streamers["text_encoder"] = streamer
            else:
                self._homes["text_encoder"] = [ModuleHome(llama, device, dtype), ModuleHome(clip, device, dtype)]
        image_encoder = models["image_encoder"]
        if image_encoder is not None and getattr(image_encoder, "model", None) is not None:
            self._homes["image_encoder"] = [ModuleHome(image_encoder.model, device, dtype)]
        if models["vae"] is not None:
            self._homes["vae"] = [ModuleHome(models["vae"], device)]
            models["vae"].memory_budget_bytes = plan.vae_budget_bytes or None
        for name, homes in self._homes.items():
            if plan.placements.get(name) == "device":
                for home in homes:
                    home.to_device()

    def streamer(self, name: str = "transformer") -> BlockStreamer | None:
        """The block streamer of the DiT (or of the Llama, "text_encoder"), or None where nothing streams."""
        if name == "transformer":
            return None if self.dit is None else self.dit.streamer
        return self._streamers.get(name)

    def on_device(self, name: str) -> bool:
        """Whether `name`'s model (text_encoder, image_encoder, vae) is on the device now."""
        return any(home.on_device for home in self._homes.get(name, []))

    @contextlib.contextmanager
    def use(self, name: str):
        """`name`'s model on the device inside the block (its layers streaming, if planned so); afterwards it leaves
        the device unless the plan keeps it there. While an encoder runs the DiT's slots are given back (the DiT
        makes them again at its next step)."""
        homes = self._homes.get(name)
        if homes is None or name in self._in_use:  # not placed by the plan, or already in use further out
            yield
            return
        stay = self.plan.placements.get(name) == "device"
        streamer = self._streamers.get(name)
        if name in ("text_encoder", "image_encoder") and self.dit is not None:
            self.dit.streamer.free()
        with contextlib.ExitStack() as stack:
            self._in_use.add(name)
            stack.callback(self._in_use.discard, name)
            for home in homes:
                stack.enter_context(home.in_use(stay=stay))
            if streamer is not None:
                streamer.allocate()
                stack.callback(streamer.free)
            yield

    def drop(self, name: str) -> None:
        """Forget a model that was released: its tensors go back to the host and the placement lets go of them."""
        for home in self._homes.pop(name, []):
            home.to_host()
        streamer = self._streamers.pop(name, None)
        if streamer is not None:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []
            streamer.close()
        if name in self.models and name != "transformer":
            self.models[name] = None

    def fit(self, size: tuple[int, int], latent_window_size: int) -> MemoryPlan:
        """Makes sure the plan holds a section of `size` (height, width pixels): a larger section than it was made
        for gets a new plan (fewer resident blocks for more activations), applied before sampling starts."""
        if self.footprint is None:
            return self.plan
        work = self.footprint.section_work(latent_window_size=latent_window_size, size=size)
        if work.tokens <= self.plan.tokens and latent_window_size <= self.plan.latent_window_size:
            return self.plan
        plan = plan_memory(self.footprint, self.plan.budget_bytes, device=self.plan.device,
                           host_ram_bytes=self.host_ram_bytes, resolution=self.plan.resolution,
                           latent_window_size=latent_window_size, size=size)
        self.close()
        self._place(plan)
        return plan

    def close(self) -> None:
        """Every model back on the host, as loaded."""
        for name in list(self._homes):
            for home in self._homes.pop(name):
                home.to_host()
        for streamer in self._streamers.values():
            streamer.close()
        for handle in self._hooks:
            handle.remove()
        self._streamers, self._hooks = {}, []
        if self.dit is not None:
            self.dit.close()
