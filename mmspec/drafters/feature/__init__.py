"""Feature-level drafters (EAGLE family) for VLM targets: one configurable network, many papers.

The drafter is one (or two) Llama-style decoder layer(s) that share the target's frozen token
embeddings, final norm and LM head (loaded from the target, never saved). Its own sequence has one
entry per target position p: input x_p = fc(concat(emb(token[p+1]), feature[p])), where feature[p]
is the target's last-layer hidden state at p (the engine's `hidden_states[-1]`, already final-normed
so that `lm_head(feature) = logits`). The output residual r_p gives the predicted next feature
f_{p+1} = norm(r_p), decoded by the target's LM head into the distribution of token[p+2]. While
drafting, a tree node's input takes its parent's *predicted* feature (autoregression over the tree);
the drafter keeps its own KV cache in preallocated buffers (`_Buffers`), feeds tree nodes after the
committed rows with a tree mask, and keeps only the committed rows (the rest are stale and masked).

Options (all switchable in `FeatConfig`; `VARIANTS` names the published recipes; every variant
trains with EAGLE-3's training-time test, `unroll`). EAGLE-3 itself is not a variant here: mmspec's
EAGLE-3 drafter (assets/models/mmspec-feat-eagle3) is a head in the vLLM / SGLang format
(`mmspec.drafters.eagle3_head`, trained by `mmspec.train_eagle3`); the fused-feature network that
stood in for it before is retired, and a saved one is refused at load (`files`).
- dream (DREAM): a cross-attention block after the first layer, tanh gate initialised at 0,
  RMSNorm on q and k, reading intermediate target features of layers chosen by attention entropy
  (`mmspec.entropy.choose_layers`); its output is also regressed onto the lowest-entropy layer.
- compress (visual-token compression of the drafter's view of the image span):
  `pool` (k x k spatial average), `topk` (keep the visual tokens that receive the most attention
  from the target's last layer), `queries` (ViSpec/FLASH: learnable queries cross-attend over the
  image embeddings and replace the image span, placed at its last positions). Each produces a
  per-visual-token status map (kept / merged / dropped) for the UI.
- global_image (ViSpec): an extra query gives a global image vector g fused into every text entry
  after the image: x <- gfuse(concat(x, g)), initialised to identity on x, zero on g.
- msd (MSD): visual entries take the raw projector embedding through their own path vis_fc(emb),
  no target feature; trained text-only first, then with a rising share of multimodal samples.
- aasd (AASD): no drafter entries for the prompt: the first layer attends to the target's own KV
  cache of the prompt + image (one target layer) through a learned projection (head mixing for the
  rotated keys, a linear map for the values).
- flash (FLASH): k > 1 semi-autoregressive heads: one drafter forward emits k future features
  (head j predicts f_{p+1+j}); deeper tree levels reuse them and the drafter runs once per k levels.

Which drafter entry is "visual": entry p pairs feature[p] with token[p+1]; it is visual when
token[p+1] is an image token. Visual token i of the image at sequence index v0 + i is entry v0 + i - 1.
The drafter uses 1-D RoPE over sequence indices (also for Qwen2-VL targets); the target's positions
are its own business, losslessness never depends on the drafter.

Where this departs from the papers (deliberately, to keep one small network): DREAM's
self/cross/self stack is one self-attention layer with the cross block between its attention and
MLP, and the entropy-chosen layers are chosen once per target (not per token); MSD keeps 1-D RoPE
(no M-RoPE in the drafter); AASD reads one target layer's cache (the last); FLASH's latent queries
are ViSpec's adaptor with more queries.

Where each part lives (one job per module):
- `net`: FeatConfig, `VARIANTS`, `make_config`, FeatNet and its layers, RoPE / attention helpers.
- `plan`: the drafter's view of the prompt: `Entry`, `plan_entries` (compression and the visual
  map), `image_grid`, `image_span`.
- `files`: the saved directory (mmspec_drafter.json + model.safetensors): save / load /
  `is_feature_drafter`, the target fingerprint and the config checks a loaded file passes.
- `calibrate`: the target's attention-entropy profile over (image, prompt) examples the caller
  hands in (decoding never imports the synthetic world; `mmspec.world.default_calibration` makes
  examples from it).
- `drafter`: the engine-facing FeatureDrafter (per-request state, preallocated buffers, the device
  step) and `create_feature_drafter` (an untrained one, for tests and the start of training).
"""
