"""``TIPRModel``: the CLIP dual encoder every method builds on, and the contract a method fulfils.

A method (``tipr/methods/<name>/``) subclasses :class:`TIPRModel` and adds its
heads and objective. What every method offers, and what the shared code uses:

- retrieval: :meth:`encode_image`, :meth:`encode_text`, :meth:`similarity`;
- training: ``forward(**batch)`` with the fields named in :attr:`batch_fields`
  (Hugging Face names: ``pixel_values``, ``input_ids``, ``pids``, and the
  method's own), returning a ``ModelOutput`` with ``loss`` and each term;
  :meth:`parameter_groups` for its recipe; :meth:`sample_fields`, the per-sample
  data it needs from the loader (SEN's masking noise, IRRA's masked caption);
- sharing: :meth:`save_pretrained` / :meth:`from_pretrained` / ``push_to_hub``
  (``huggingface_hub``'s ``PyTorchModelHubMixin``; the folder's ``README.md`` is
  tipr's model card, :meth:`generate_model_card`). ``TIPRModel.from_pretrained``
  returns the method the folder's ``config.json`` names, in the manner of
  transformers' ``AutoModel``.

Batch-level losses see the whole global batch under data parallelism only when
:attr:`gather_across_ranks` is on; the training module turns it on, so calling a
model on one rank of a process group (debugging, a rank-0 check) never waits for
the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import nn

from tipr.model.backbone import build_clip, eot_token_id, set_image_size
from tipr.model.config import EncoderConfig, MethodConfig, load_config, save_config
from tipr.model.distributed import all_gather_no_grad, all_gather_with_grad
from tipr.model.hub import (CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, is_tipr_card, load_weights, model_card_text,
                            pretrained_files)
from tipr.model.losses import identity_classifier


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class TIPRModel(nn.Module, PyTorchModelHubMixin, library_name="tipr", tags=["text-to-image-person-retrieval"]):
    """A CLIP dual encoder (with the ID classifier when ``num_classes > 0``) and a method's heads.

    Args:
        encoder: the dual encoder's config (:class:`EncoderConfig`).
        config: the method's settings (the subclass's :class:`MethodConfig`).
        clip: a ready ``transformers.CLIPModel`` whose config is ``encoder.clip``
            (pretrained weights); built from ``encoder.clip`` with random weights when None.
    """

    #: The method's config class (set by each subclass).
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: The batch fields ``forward`` takes, in order (Hugging Face names at the seams).
    batch_fields: ClassVar[tuple[str, ...]] = ("pixel_values", "input_ids", "pids")

    def __init__(self, encoder: EncoderConfig, config: MethodConfig, clip: nn.Module | None = None):
        super().__init__()
        if type(self) is TIPRModel:
            raise TypeError("TIPRModel is the base of the methods; build SENModel, IRRAModel... or use from_pretrained")
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}, got {type(config).__name__}")
        self.clip = build_clip(encoder.clip, encoder.text_length) if clip is None else clip
        self.encoder_config = EncoderConfig(**{**encoder.__dict__, "clip": self.clip.config.to_dict()})
        self.config = config
        self.image_size = self.encoder_config.image_size
        self.text_length = int(encoder.text_length)
        context = self.clip.config.text_config.max_position_embeddings
        if not 1 < self.text_length <= context:
            raise ValueError(f"text_length must be in 2..{context} (the text encoder's context), got {self.text_length}")
        set_image_size(self.clip, self.image_size, interpolation=encoder.position_interpolation)
        self.eot_token_id = eot_token_id(self.clip.config)
        self.vocab_size = self.clip.config.text_config.vocab_size
        self.embed_dim = self.clip.config.projection_dim
        self.num_classes = int(encoder.num_classes)
        self.classifier = identity_classifier(self.embed_dim, self.num_classes) if self.num_classes > 0 else None
        if self.classifier is None and config.loss_weights.get("id", 0) > 0:
            raise ValueError(f"{config.name}: id_weight > 0 needs num_classes >= 1 (the ID classifier), got 0")
        #: Batch-level losses over every rank's samples (set by the training module under DDP).
        self.gather_across_ranks = False
        self.reference_fp16_weights = bool(encoder.reference_fp16_weights)

    def finish_init(self) -> None:
        """Called at the end of a subclass's ``__init__``: the reference fp16 cast, train mode."""
        if self.reference_fp16_weights:
            cast_to_reference_fp16(self)
        self.train()  # CLIPModel.from_pretrained returns the backbone in eval mode

    @classmethod
    def from_backbone(
        cls,
        backbone: str | Mapping[str, Any] | nn.Module,
        num_classes: int,
        config: MethodConfig | None = None,
        **encoder_settings: Any,
    ) -> TIPRModel:
        """A model around a CLIP backbone: a preset name (``"tiny"``), a dict of ``CLIPConfig`` arguments
        (random weights), a local CLIP folder or a hub id (pretrained, see
        :func:`tipr.model.backbone.build_clip`), or a ready ``CLIPModel``.

        ``config``: the method's settings (its defaults when None); ``encoder_settings``:
        the other :class:`EncoderConfig` fields (``image_size``, ``text_length``, ...).
        """
        if cls is TIPRModel:
            raise TypeError("call from_backbone on a method's model class (SENModel, IRRAModel, ...)")
        text_length = int(encoder_settings.get("text_length", 77))
        clip = backbone if isinstance(backbone, nn.Module) else build_clip(backbone, text_length)
        encoder = EncoderConfig(clip=clip.config.to_dict(), num_classes=num_classes, **encoder_settings)
        return cls(encoder, config if config is not None else cls.config_class(), clip=clip)

    @property
    def method(self) -> str:
        """The registered method name (``"sen"``, ``"irra"``)."""
        return self.config.name

    @property
    def embeddings(self):
        """The vision embeddings (:class:`tipr.model.backbone.GridVisionEmbeddings`) inside ``clip``."""
        return self.clip.vision_model.embeddings

    def precision_context(self, device: torch.device) -> contextlib.AbstractContextManager:
        """fp16 autocast with ``reference_fp16_weights`` (the fp16 weights meet fp32 norms), else nothing."""
        if self.reference_fp16_weights:
            return torch.autocast(device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------ pretrained
    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_model

        save_config(save_directory / CONFIG_FILE, self.encoder_config, self.config)
        save_model(self, str(save_directory / WEIGHTS_FILE))
        if is_tipr_card(save_directory / CARD_FILE):  # a card of earlier weights: the mixin writes it anew
            (save_directory / CARD_FILE).unlink()

    def generate_model_card(self, *args, model_id: str | None = None, **kwargs) -> ModelCard:
        """The folder's ``README.md`` (``save_pretrained`` and ``push_to_hub`` write it): what the model is
        and how to load it (:func:`tipr.model.hub.model_card_text`); ``model_id``: the hub id it is uploaded to."""
        return ModelCard(model_card_text(self, self._hub_mixin_info.model_card_data, model_id))

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict | None = None, **kwargs) -> str:
        """``PyTorchModelHubMixin.push_to_hub`` (the model alone: :func:`tipr.pretrained.push_to_hub` adds the
        processor), with a card whose load lines name ``repo_id``."""
        return super().push_to_hub(repo_id, model_card_kwargs={"model_id": repo_id, **(model_card_kwargs or {})}, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        map_location: str | torch.device = "cpu",
    ) -> TIPRModel:
        """The model a :meth:`save_pretrained` (or ``tipr fit`` / ``tipr convert``) wrote.

        ``TIPRModel.from_pretrained`` returns the method its ``config.json`` names
        (``model_type``); ``SENModel.from_pretrained`` of another method's folder is an
        error naming both.

        Args:
            pretrained_model_name_or_path: a local folder (never touches the network)
                or a Hugging Face hub id (downloaded to the hub cache).
            revision, cache_dir, local_files_only, token: for hub ids, as in ``huggingface_hub``.
            map_location: device of the returned weights.

        Every weight of the file must match the network built from its config (names
        and shapes); the model is returned in eval mode.
        """
        from tipr.methods import spec_of_config

        files = pretrained_files(
            pretrained_model_name_or_path, (CONFIG_FILE, WEIGHTS_FILE), revision=revision,
            cache_dir=cache_dir, local_files_only=local_files_only, token=token,
        )
        encoder, config = load_config(files[CONFIG_FILE])
        model_class = spec_of_config(config).model_class
        if cls is not TIPRModel and not issubclass(model_class, cls):
            raise ValueError(f"{files[CONFIG_FILE]}: is an {config.name} model ({model_class.__name__}), not a "
                             f"{cls.__name__}; load it with TIPRModel.from_pretrained or {model_class.__name__}")
        model = model_class(encoder, config)
        load_weights(model, files[WEIGHTS_FILE], map_location)
        return model.eval()

    # ------------------------------------------------------------------ inputs
    def check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Raise ``ValueError`` naming the problem if ``input_ids`` cannot be encoded."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an integer (B, L) tensor, got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        if input_ids.shape[1] > self.text_length:
            raise ValueError(
                f"input_ids have {input_ids.shape[1]} positions, more than the text context ({self.text_length})"
            )
        # One host sync for both checks.
        has_eot = (input_ids == self.eot_token_id).any(dim=1)
        bad = torch.stack([~has_eot.all(), (input_ids.min() < 0) | (input_ids.max() >= self.vocab_size)]).tolist()
        if bad[0]:
            row = int((~has_eot).nonzero()[0])
            raise ValueError(f"input_ids row {row} has no end-of-text token (id {self.eot_token_id})")
        if bad[1]:
            raise ValueError(
                f"input_ids hold ids outside 0..{self.vocab_size - 1}: min {int(input_ids.min())}, "
                f"max {int(input_ids.max())}"
            )

    def check_batch(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, pids: torch.Tensor,
                    check_inputs: bool) -> None:
        """Batch sizes agree; with ``check_inputs``, the labels fit the ID classifier (a host sync)."""
        if pids.shape != (pixel_values.shape[0],) or input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(
                f"batch sizes differ: pixel_values {tuple(pixel_values.shape)}, input_ids {tuple(input_ids.shape)}, "
                f"pids {tuple(pids.shape)}"
            )
        if self.classifier is not None and check_inputs:
            low, high = torch.stack([pids.min(), pids.max()]).tolist()
            if low < 0 or high >= self.num_classes:
                raise ValueError(f"pids range {low}..{high} does not fit the ID classifier's {self.num_classes} "
                                 f"classes (expected 0..{self.num_classes - 1})")

    # ---------------------------------------------------------------- encoders
    def image_tokens(self, pixel_values: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Token features ``(B, 1 + K, D)``: CLS + patches after post-norm and projection.

        ``ids_keep`` ``(B, K)`` runs the encoder on those patches only (K = N when None).
        """
        vision = self.clip.vision_model
        x = self.embeddings(pixel_values)  # (B, 1 + N, W), positions added
        if ids_keep is not None:
            width = x.shape[-1]
            kept = torch.gather(x[:, 1:], 1, ids_keep[..., None].expand(-1, -1, width))  # (B, K, W)
            x = torch.cat([x[:, :1], kept], dim=1)  # (B, 1 + K, W)
        x = vision.pre_layrnorm(x)
        x = vision.encoder(inputs_embeds=x).last_hidden_state
        return self.clip.visual_projection(vision.post_layernorm(x))  # (B, 1 + K, D)

    def text_tokens(self, input_ids: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features ``(B, L, D)`` (final norm + projection) and the end-of-text position ``(B,)``.

        ``check``: validate ``input_ids`` first (:meth:`check_token_ids`, one host sync).
        """
        if check:
            self.check_token_ids(input_ids)
        hidden = self.clip.text_model(input_ids=input_ids).last_hidden_state  # (B, L, W), final-normed
        eot = (input_ids == self.eot_token_id).int().argmax(dim=1)  # first end-of-text token
        return self.clip.text_projection(hidden), eot

    @staticmethod
    def pooled(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``tokens[b, positions[b]]``: ``(B, L, D), (B,) -> (B, D)``."""
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), positions]

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Global image features ``(B, D)``: the CLS output after post-norm and projection."""
        with self.precision_context(pixel_values.device):
            return self.image_tokens(pixel_values)[:, 0]

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Global text features ``(B, D)``: the first end-of-text output after final norm and projection.

        The text encoder runs only up to the batch's last end-of-text position: CLIP's text
        attention is causal, so no position before it reads what follows, and the features are
        those of the full context (a 10-token query in a 77 context costs a seventh). Reading
        that position is the one host sync, shared with the input check.
        """
        self.check_token_ids(input_ids)
        end = int((input_ids == self.eot_token_id).int().argmax(dim=1).max()) + 1
        with self.precision_context(input_ids.device):
            return self.pooled(*self.text_tokens(input_ids[:, :end], check=False))

    def similarity(self, text_features: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``(Nq, Ng)`` of text queries against gallery images."""
        return F.normalize(text_features.float(), dim=-1) @ F.normalize(image_features.float(), dim=-1).t()

    # ---------------------------------------------------------------- training
    def gather(self, *tensors: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor, ...]:
        """Every rank's rows of each tensor, in rank order, when :attr:`gather_across_ranks` is on; else as is."""
        if not self.gather_across_ranks:
            return tensors
        fn = all_gather_with_grad if grad else all_gather_no_grad
        return tuple(fn(t) for t in tensors)

    def weighted_total(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``sum_term weight * loss`` over the computed terms."""
        weights = self.config.loss_weights
        return sum(weights[name] * value for name, value in losses.items())

    def sample_fields(self) -> Callable[[dict, torch.Generator], dict[str, torch.Tensor]] | None:
        """The per-sample training fields the method draws in the loader, or None.

        A picklable callable ``(sample, generator) -> {field: tensor}`` that the
        training dataset calls on each sample (``sample`` holds ``input_ids``...) with a
        generator seeded from that sample's seed, so the draws do not depend on the
        loader workers, the number of processes or where a run resumed.
        """
        return None

    def image_panels(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     generator: torch.Generator) -> dict[str, tuple[list[list[torch.Tensor]], list[str], str]]:
        """Pictures of the method's own heads for the W&B panels: ``{name: (rows of normalised
        (3, H, W) images, column labels, caption)}``; none by default."""
        return {}

    def parameter_groups(self, lr: float, lr_factor: float, bias_lr_factor: float,
                         weight_decay: float) -> list[dict[str, Any]]:
        """Adam groups of the method's recipe: base (lr, wd), boosted (lr * lr_factor, wd), bias
        (lr * bias_lr_factor, no wd), boosted_bias (lr * lr_factor, no wd).

        ``config.boosted_modules`` and ``config.boosted_bias_modules`` (parameter-name
        prefixes) say which parameters are boosted; each must match a parameter.
        """
        boosted, boosted_bias = self.config.boosted_modules, self.config.boosted_bias_modules
        names = [name for name, _ in self.named_parameters()]
        for option, prefixes in (("boosted_modules", boosted), ("boosted_bias_modules", boosted_bias)):
            for prefix in prefixes:
                if not any(_matches(n, [prefix]) for n in names):
                    tops = sorted({n.split(".")[0] for n in names})
                    raise ValueError(f"model.method.{option}: {prefix!r} matches no parameter of the {self.method} "
                                     f"network; expected a prefix of parameter names (top-level modules: {tops})")
        groups: dict[str, dict[str, Any]] = {
            "base": {"params": [], "lr": lr, "weight_decay": weight_decay},
            "boosted": {"params": [], "lr": lr * lr_factor, "weight_decay": weight_decay},
            "bias": {"params": [], "lr": lr * bias_lr_factor, "weight_decay": 0.0},
            "boosted_bias": {"params": [], "lr": lr * lr_factor, "weight_decay": 0.0},
        }
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith("bias"):
                key = "boosted_bias" if _matches(name, boosted_bias) else "bias"
            elif _matches(name, boosted):
                key = "boosted"
            else:
                key = "base"
            groups[key]["params"].append(param)
        return [{"name": key, **group} for key, group in groups.items() if group["params"]]


def cast_to_reference_fp16(module: nn.Module) -> None:
    """The reference's (OpenAI CLIP's) ``convert_weights``, in place: linear, convolution and
    attention-projection weights and biases to fp16; layer norms, embeddings and loose
    parameters (CLS embedding, TIR mask token) stay fp32."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.half()
        elif isinstance(m, nn.MultiheadAttention):
            for name in ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
                param = getattr(m, name, None)
                if param is not None:
                    param.data = param.data.half()
