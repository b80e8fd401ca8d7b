"""Configuration of the demo dual encoder (workflows/demo/train_demo_clip.py trains it; ConceptCLIP's interface)."""

from transformers import PretrainedConfig


class DemoClipConfig(PretrainedConfig):
    """A small CNN image tower and a token-embedding text tower meeting in one `embed_dim`-d space."""

    model_type = "democlip"

    def __init__(
        self,
        image_size=64,
        widths=(24, 32, 48, 64),
        embed_dim=64,
        vocab_size=512,
        text_width=64,
        pad_token_id=0,
        logit_scale_init=2.6593,  # log(1 / 0.07), as CLIP
        **kwargs,
    ):
        self.image_size = image_size
        self.widths = list(widths)
        self.embed_dim = embed_dim
        self.vocab_size = vocab_size
        self.text_width = text_width
        self.logit_scale_init = logit_scale_init
        super().__init__(pad_token_id=pad_token_id, **kwargs)
