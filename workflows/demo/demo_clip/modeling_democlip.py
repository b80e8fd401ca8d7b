"""The demo dual encoder: ConceptCLIP's interface on a model small enough to train on a laptop CPU.

    encode_image(pixel_values, normalize=False) -> (pooled (B, D), tokens (B, N, C))
    encode_text(input_ids, attention_mask=None, normalize=False) -> (pooled (B, D), tokens (B, L, W))
    logit_scale: the log of the CLIP temperature (logits = logit_scale.exp() * cos)

Image tower: four 3x3 convolutions (GroupNorm, GELU; the last three with stride 2) on 64 x 64 inputs, then the
mean and standard deviation of the final 8 x 8 map, projected to D. Text tower: token embeddings, a learned
salience per token (softmax over the attention mask: a weighted mean that can ignore template words), then a
residual MLP to D. The pooled outputs are the vectors the image-text logits use; there is no further projection.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_democlip import DemoClipConfig


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.GroupNorm(min(8, cout // 4), cout),
            nn.GELU(),
        )


class DemoClipModel(PreTrainedModel):
    config_class = DemoClipConfig
    base_model_prefix = "democlip"
    main_input_name = "pixel_values"

    def __init__(self, config: DemoClipConfig) -> None:
        super().__init__(config)
        w = list(config.widths)
        self.visual = nn.Sequential(
            *[_Block(a, b, 1 if i == 0 else 2) for i, (a, b) in enumerate(zip([3, *w[:-1]], w, strict=True))]
        )
        self.visual_head = nn.Linear(2 * w[-1], config.embed_dim)
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width, padding_idx=config.pad_token_id)
        self.token_salience = nn.Linear(config.text_width, 1)
        self.text_mlp = nn.Sequential(
            nn.LayerNorm(config.text_width),
            nn.Linear(config.text_width, 2 * config.text_width),
            nn.GELU(),
            nn.Linear(2 * config.text_width, config.text_width),
        )
        self.text_head = nn.Linear(config.text_width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.3)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def encode_image(self, pixel_values: torch.Tensor, normalize: bool = False):
        fmap = self.visual(pixel_values)
        flat = fmap.flatten(2)  # (B, C, N)
        stats = torch.cat([flat.mean(-1), flat.std(-1)], dim=1)
        pooled = self.visual_head(stats)
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled, flat.transpose(1, 2)

    def encode_text(self, input_ids: torch.Tensor, attention_mask=None, normalize: bool = False):
        tokens = self.token_embedding(input_ids)
        mask = attention_mask if attention_mask is not None else (input_ids != self.config.pad_token_id).long()
        score = self.token_salience(tokens).squeeze(-1).masked_fill(mask == 0, float("-inf"))
        weights = torch.softmax(score, dim=-1).unsqueeze(-1)
        pooled = (weights * tokens).sum(1)
        pooled = self.text_head(pooled + self.text_mlp(pooled))
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        return pooled, tokens

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, **kwargs):
        out = {"logit_scale": self.logit_scale.exp()}
        if pixel_values is not None:
            out["image_features"] = self.encode_image(pixel_values, normalize=True)[0]
        if input_ids is not None:
            out["text_features"] = self.encode_text(input_ids, attention_mask, normalize=True)[0]
        if pixel_values is not None and input_ids is not None:
            out["logits_per_image"] = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        return out
