"""Small sizes that keep a stage's run in seconds, shared by the integration and e2e tests."""

SMALL = {
    "data.synthetic.num_sft": 200,
    "data.synthetic.num_preference": 200,
    "data.synthetic.num_prompts": 100,
    "model.tiny.hidden_size": 32,
    "model.tiny.intermediate_size": 64,
    "model.tiny.num_layers": 1,
    "model.tiny.num_heads": 2,
}
