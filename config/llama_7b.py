# A LLaMA-2-7B-shaped model (4096 wide, 32 layers, 32 heads, SwiGLU hidden width 11008, sequences of
# 2048) on the 1.3B run's data. Its ~16 bytes of fp32 state per parameter do not fit one GPU under
# DDP, so it is sharded with FSDP2 across the ranks. How much memory each GPU needs, before renting
# them:
#   python bench.py config/llama_7b.py --estimate=True --world_size=8 --gpu_memory=80
# Then: torchrun --standalone --nproc_per_node=8 train.py config/llama_7b.py
dataset_dir = "data/fineweb_edu"
ckpt_dir = "out/llama_7b"

# 2 sequences of 2048 tokens per GPU per micro-step; 2**20 tokens per optimizer update by
# accumulation (32 micro-steps on 8 GPUs).
batch_size = 2
max_seq_len = 2048
tokens_per_update = 2**20

n_embd = 4096
n_heads = 32
n_kv_heads = 32
n_layers = 32
# SwiGLU width: 2/3 of 4 x 4096 = 10922, rounded up to a multiple of 256 = 11008, LLaMA-2-7B's
# width.
multiple_of = 256
eps = 1e-5
theta = 10_000.0
dropout = 0.0

schedule = "cosine"
warmup_iterations = 2000
max_lr = 3e-4
min_lr = 3e-5
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
# The guide's AdamW. Muon, the CPU default, also trains under DDP and FSDP (each rank orthogonalizes
# its share of the matrices), but its learning rates were tuned on a 3M-parameter model and it has
# not been measured at this scale; try it with --optimizer=muon --muon_lr=... once a short run on
# your GPUs compares the two.
optimizer = "adamw"
grad_clip = 1.0

training_tokens = 45_000_000_000
eval_interval = 100
eval_tokens = 2**20
token_ckpt = 1_000_000_000
model_gen_multiplier = 2.0
dtype = "auto"
compile = True
fsdp = True
# `python bench.py config/llama_7b.py --estimate=True` shows the memory with and without it: True
# stores one input per Block instead of every activation, for about a third more compute per update.
activation_checkpointing = False
