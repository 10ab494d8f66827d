"""Encoders whose residual stream is hooked: one adapter per `--model`, the flags that pick them.

Usage (what train_image.py / train_text.py do, through sae.encoders.registry):

    parser = argparse.ArgumentParser(); add_model_args(parser, "image")
    args = parser.parse_args()
    spec = spec_from_args(args)                 # ModelSpec: which model, nothing loaded yet
    layers = spec.info().resolve_layers(args.layers)   # reads the config only (no weights)
    adapter = spec.load()                       # weights on the GPU when there is one
    batch = adapter.preprocess(items)           # items: list of PIL images or list of str
    out = adapter.forward(batch, layers, token=args.token)
    out.hidden[l]   # [B, T, d] residual stream after block l (before any final norm / pooling)
    out.mask        # [B, T] bool, True on real (non-padding) tokens
    out.train_mask_of(l)  # [B, T] bool, the tokens an SAE trains on (real ones; SiglipText: + the last position)
    out.pooled[l]   # [B, d] the recorded position (--token)
    adapter.embed(batch)  # [B, d_embed] float32: the joint image-text embedding (CLIP, SigLIP families)

Each adapter registers forward hooks on the transformer blocks, keeps the block output (`output[0]`
when a block returns a tuple) and stops the forward after the deepest requested block by raising a
private exception from that block's hook: deeper blocks, final norms and heads never run.

Families (the `--model` values) and the recorded position of `--token pooled`:

    ClipVision     open_clip visual tower       CLS (position 0); CLIP ResNets (RN50, ...): see below
    SigLIP2Vision  transformers SigLIP/SigLIP2  mean of the patch tokens (there is no CLS)
    ViT            transformers ViTModel        CLS
    DinoV2         transformers Dinov2Model     CLS
    ClipText       open_clip text tower         EOT token (argmax of the token ids)
    SiglipText     transformers SigLIP text     last position (the model's own pooling)
    Bert           transformers BertModel       [CLS]
    Deberta        transformers DebertaModel    [CLS]

CLIP ResNet towers (open_clip `RN50`, `RN101`, ... : ModifiedResNet) are hooked after each residual
stage and at the attention pool: 5 "blocks" = [layer1, layer2, layer3, layer4, attnpool]. A stage output
[B, C, H, W] is presented as H*W spatial tokens [B, H*W, C] (row-major positions: an SAE trains on every
spatial position, like patches); the attnpool output [B, D] is one token [B, 1, D]. The widths differ
per block (RN50: 256, 512, 1024, 2048, then embed_dim 1024): `ModelInfo.widths` / `Adapter.widths` hold
them and `d_of(layer)` returns one (`d_model` is the last block's). `--token pooled` records the mean over
the spatial positions for a stage and the attnpool output itself for the attention pool (the mean of
its single token); `first`/`last` are the top-left/bottom-right positions. Since the token counts differ
per block, `EncoderOutput.masks` holds one mask per layer.
"""

from __future__ import annotations
