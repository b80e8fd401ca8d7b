"""Stage 4: explanations of MIL predictions — `config` (the `explain:` section, concept sets), `concepts`
(loading concept sets from `workflows/concepts/` or a YAML path, prompt expansion, the prompt hash)."""
