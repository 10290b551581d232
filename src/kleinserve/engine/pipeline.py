"""Pipeline: ResolvedRequest(s) -> GenerateResult(s), one batch per call; the `Engine` of engine/protocol.py.

    pipeline = load_pipeline("tiny-random")
    result = pipeline.generate(GenerateRequest(prompt="a red circle", width=128, height=128, seed=7))
    result.images[0].image.save("out.png")

A batch is any list of resolved requests (engine/resolve.py) sharing size, steps, guidance, text length and
reference geometry (`ResolvedRequest.batch_key`); their prompts, seeds, reference pixels, LoRA adapters, masks
and strengths may differ (inpainting and image-to-image: engine/inpaint.py). Each image is the image its seed
gives alone: image i of a request with seed s uses seed s + i (guarded by tests/engine/test_batching.py), with
its request's adapters as diffusers applies them to that request alone (engine/lora_layers.py;
tests/engine/test_lora.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

from kleinserve.engine import latents as L
from kleinserve.engine import spec as limits
from kleinserve.engine.components import ModelComponents
from kleinserve.engine.inpaint import KnownLatents
from kleinserve.engine.lora import AdapterLibrary, LoadedAdapter
from kleinserve.engine.lora_layers import AdapterRows, RowRouting, plan_rows, wrap_layers
from kleinserve.engine.protocol import EngineStats
from kleinserve.engine.references import encode_references, vae_latents
from kleinserve.engine.resolve import ResolvedRequest, resolve_request, restore_request
from kleinserve.engine.sampling import ClassifierFreeGuidance, denoise, make_scheduler
from kleinserve.engine.spec import ModelSpec
from kleinserve.engine.text import PromptEmbeddingCache, PromptEncoder
from kleinserve.errors import InvalidInput
from kleinserve.types import (
    CancelCheck,
    GeneratedImage,
    GenerateRequest,
    GenerateResult,
    Progress,
    StepCallback,
)

DECODE_PIXELS = 1024 * 1024  # output pixels per VAE decode call (1 MP: one image at a time at klein sizes)

_postprocessor = Flux2ImageProcessor(vae_scale_factor=limits.SIZE_MULTIPLE)


class Pipeline:
    """A loaded model that turns requests into images: the `Engine` (engine/protocol.py). Not thread-safe:
    one caller at a time. `adapters`: the LoRA adapters requests may name (None: they may name none)."""

    def __init__(
        self,
        components: ModelComponents,
        cache: PromptEmbeddingCache | None = None,
        adapters: AdapterLibrary | None = None,
    ) -> None:
        self.components = components
        placement = components.placement
        self.device = placement.device
        self.dtype = placement.dtype
        self.prompts = PromptEncoder(components.tokenizer, components.text_encoder, self.dtype, cache)
        self.adapters = adapters
        self._routing = RowRouting()

    @property
    def spec(self) -> ModelSpec:
        return self.components.spec

    def resolve(self, request: GenerateRequest) -> ResolvedRequest:
        """Apply defaults and policy and check every value; raises InvalidInput naming the parameter."""
        return resolve_request(request, self.spec, self.adapters)

    def restore(self, stored: GenerateRequest) -> ResolvedRequest:
        """The resolution of a stored request (`ResolvedRequest.stored`); nothing checked or prepared."""
        return restore_request(stored, self.spec)

    def stats(self) -> EngineStats:
        """The prompt cache's counters now."""
        cache = self.prompts.cache
        return EngineStats(cache.hits, cache.misses)

    def generate(
        self,
        request: GenerateRequest,
        on_step: StepCallback | None = None,
        cancelled: CancelCheck | None = None,
    ) -> GenerateResult:
        """Resolve `request` and run it alone (warm-up, CLI, tests)."""
        return self.generate_batch([self.resolve(request)], on_step, cancelled)[0]

    @torch.inference_mode()
    def generate_batch(
        self,
        resolved: Sequence[ResolvedRequest],
        on_step: StepCallback | None = None,
        cancelled: CancelCheck | None = None,
    ) -> list[GenerateResult]:
        """Run resolved requests of one batch key as one batch; results are in request order. Each result's
        `timings` (stage -> seconds, shared by the batch) cover the engine's whole call but for building the
        results and the time spent in `on_step`."""
        timings: dict[str, float] = {}
        first = resolved[0]
        if any(r.batch_key != first.batch_key for r in resolved):
            raise InvalidInput("requests in one batch must share size, steps, guidance and reference sizes")
        components = self.components
        h, w = first.height // limits.SIZE_MULTIPLE, first.width // limits.SIZE_MULTIPLE
        seeds = [seed for r in resolved for seed in r.seeds]
        length = first.max_sequence_length

        with self._timed(timings, "text_encoding"), self._resident(components.text_encoder):
            prompts = [r.request.prompt for r in resolved for _ in r.seeds]
            embeds = self.prompts.encode(prompts, length, self.device)  # (B, L, D)
            prompt_tokens = self.prompts.count_tokens([r.request.prompt for r in resolved], length)
            if first.use_cfg:
                negatives = [r.request.negative_prompt for r in resolved for _ in r.seeds]
                embeds = torch.cat([embeds, self.prompts.encode(negatives, length, self.device)])
        with self._timed(timings, "reference_encoding"), self._resident(components.vae):
            reference_tokens = self._encode_references(resolved)  # (B, N_ref, C) or None
        with self._timed(timings, "preparation"):
            channels = components.transformer.config.in_channels
            noise = L.pack(L.draw_noise(seeds, channels, h, w)).to(self.device, self.dtype)  # (B, h*w, C)
            scheduler = make_scheduler(components.scheduler_config, first.steps, image_seq_len=h * w)
            known = None
            if first.edit is not None and reference_tokens is not None:  # the edited image: reference 0
                known = self._known_latents(resolved, reference_tokens[:, : h * w], noise, scheduler.sigmas)
            if first.use_cfg and reference_tokens is not None:
                reference_tokens = torch.cat([reference_tokens, reference_tokens])  # [cond | uncond]
            ids = torch.cat([L.image_ids(h, w), L.reference_ids([r.grid for r in first.references])])
            forward = partial(
                self.velocity,
                embeds=embeds,
                reference_tokens=reference_tokens,
                img_ids=ids.to(self.device),
                txt_ids=L.text_ids(length).to(self.device),
            )
            velocity = ClassifierFreeGuidance(forward, first.guidance) if first.use_cfg else forward
            copies = 2 if first.use_cfg else 1
            adapter_rows = self._adapter_rows(resolved, copies)

        caller_seconds = 0.0  # spent in on_step: the caller's work (progress, previews), not the engine's

        def step_hook(step: int, total: int, estimate: torch.Tensor, seconds: float) -> None:
            nonlocal caller_seconds
            if on_step is not None:
                start = time.perf_counter()
                on_step(Progress(step, total, seconds, preview=lambda: self._decode(estimate, h, w)))
                caller_seconds += time.perf_counter() - start

        with (
            self._timed(timings, "denoising"),
            self._resident(components.transformer),
            self._routing.active(adapter_rows, batch=len(seeds) * copies),
        ):
            if known is None:
                packed = denoise(velocity, noise, scheduler, step_hook, cancelled)
            else:
                start, correct = known.first_step, known.after_step
                packed = denoise(velocity, known.initial(), scheduler, step_hook, cancelled, start, correct)
        timings["denoising"] -= caller_seconds

        with self._timed(timings, "vae_decode"), self._resident(components.vae):
            images = self._decode(packed, h, w)

        results = []
        outputs_left = iter(images)
        for r, tokens in zip(resolved, prompt_tokens, strict=True):
            outputs = tuple(GeneratedImage(next(outputs_left), seed) for seed in r.seeds)
            results.append(
                GenerateResult(
                    outputs,
                    r.width,
                    r.height,
                    r.steps,
                    r.guidance,
                    prompt_tokens=tokens,
                    reference_sizes=tuple(reference.size for reference in r.references),
                    timings=dict(timings),
                )
            )
        return results

    def _adapter_rows(self, resolved: Sequence[ResolvedRequest], copies: int) -> tuple[AdapterRows, ...]:
        """The batch's adapters by row (`copies` of each image: 2 under CFG), each loaded (from the library's
        cache) and the transformer layers they adapt wrapped; () when no request names one."""
        if not any(r.request.loras for r in resolved):
            return ()
        if self.adapters is None:  # resolve refuses these; a stored request may come from another server
            raise InvalidInput("this server applies no LoRA adapters", param="loras", allowed="no loras")
        per_image: list[list[tuple[LoadedAdapter, float]]] = []
        for r in resolved:
            chosen = [(self.adapters.load(choice.adapter), choice.scale) for choice in r.request.loras]
            per_image.extend(chosen for _ in r.seeds)
        layers = {name for chosen in per_image for adapter, _ in chosen for name in adapter.factors}
        wrap_layers(self.components.transformer, sorted(layers), self._routing)
        return plan_rows(per_image, copies, self.dtype, self.device)

    def _known_latents(
        self,
        resolved: Sequence[ResolvedRequest],
        clean: torch.Tensor,
        noise: torch.Tensor,
        sigmas: torch.Tensor,
    ) -> KnownLatents:
        """An edit batch's known latents: `clean` (B, h*w, C) the edited images' tokens (each image's first
        reference), `noise` (B, h*w, C) its noise; masks and start steps per image from its request."""
        h, w = resolved[0].height // limits.SIZE_MULTIPLE, resolved[0].width // limits.SIZE_MULTIPLE
        masks: list[torch.Tensor] = []
        starts: list[int] = []
        for r in resolved:
            assert r.edit is not None  # the batch key keeps edits apart from other requests
            tokens = r.edit.mask_tokens(h, w)
            mask = torch.ones((1, h * w, 1)) if tokens is None else tokens
            masks.extend(mask for _ in r.seeds)
            starts.extend(r.edit.start_step(r.steps) for _ in r.seeds)
        return KnownLatents(
            clean=clean,
            noise=noise,
            mask=torch.cat(masks).to(self.device, self.dtype),
            starts=torch.tensor(starts, device=self.device),
            sigmas=sigmas.to(self.device),
        )

    def _encode_references(self, resolved: Sequence[ResolvedRequest]) -> torch.Tensor | None:
        """(B, N_ref, C) reference tokens, each image carrying its own request's references; None without."""
        if not resolved[0].references:
            return None
        vae = self.components.vae
        per_request = [encode_references(list(r.references), vae, self.dtype) for r in resolved]
        return torch.cat([tokens for r, tokens in zip(resolved, per_request, strict=True) for _ in r.seeds])

    def velocity(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        embeds: torch.Tensor,
        reference_tokens: torch.Tensor | None,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
    ) -> torch.Tensor:
        """One transformer pass over [target | references]; returns the target tokens' velocity (B, N, C)."""
        hidden = x if reference_tokens is None else torch.cat([x, reference_tokens.to(x)], dim=1)
        out = self.components.transformer(
            hidden_states=hidden.to(self.dtype),
            encoder_hidden_states=embeds,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None,
            return_dict=False,
        )[0]
        return out[:, : x.shape[1]]

    def _decode(self, packed: torch.Tensor, h: int, w: int) -> list:
        """Packed clean latents (B, h*w, C) -> PIL images. Images are decoded together up to DECODE_PIXELS
        per VAE call: one call per small image costs the same per-call overhead B times (batched serving of
        small images), while decoding several large images at once only raises peak memory."""
        vae = self.components.vae
        latents = vae_latents(packed, vae, h, w)
        images = []
        vae_device = next(vae.parameters()).device
        vae_dtype = next(vae.parameters()).dtype
        per_call = max(1, DECODE_PIXELS // (h * w * limits.SIZE_MULTIPLE**2))
        for latent in latents.split(per_call):
            decoded = vae.decode(latent.to(vae_device, vae_dtype), return_dict=False)[0]
            images.extend(_postprocessor.postprocess(decoded.float(), output_type="pil"))
        return images

    @contextlib.contextmanager
    def _resident(self, module: torch.nn.Module) -> Iterator[None]:
        """With offloading (CUDA), a component sits on the GPU only while it is used."""
        if not self.components.placement.offload:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")

    @staticmethod
    @contextlib.contextmanager
    def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
        """Adds the time spent in the block to `timings[stage]` (a stage may be timed in several parts)."""
        start = time.perf_counter()
        yield
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
