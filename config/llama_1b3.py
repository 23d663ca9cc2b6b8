# The 1.3B-parameter LLaMA-style run of the SimpleLLaMA pretraining guide, on FineWeb-Edu (45B
# tokens).
# Where the values come from: the batching and architecture numbers (4 x 2048 per GPU, 2**19 tokens
# per update, 2048 wide, 32 heads, 24 layers, multiple_of 256, eps, theta, dropout) are in the
# guide's TrainingConfig listing;
# 45e9 training tokens and an evaluation every 32 updates are its examples in the text. The guide's
# text gives no values for the schedule and the optimizer: warm-up 500, max_lr 1e-4, min_lr 1e-5,
# betas (0.9, 0.95), weight_decay 0.1 and a checkpoint every 1e9 tokens come from the TrainingConfig
# in SimpleLLaMA's code (github.com/IvanC987/SimpleLLaMA, simple_llama/pretraining/config.py).
# grad_clip 1.0 is the value its training loop hard-codes. Its model_gen_multiplier is 1.5 on a
# different schedule (README, "Differences from the guide").
#
# Data: the guide trains one pass over unique tokens. FineWeb-Edu's sample-10BT holds about 10B
# (GPT-2) tokens, so 45B tokens would be 4.5 passes over it; sample-100BT holds about 100B, so the
# run reads under half of it once.
# Preparing all of it takes a network and, at 2 bytes per token, a few hundred GB of disk for the
# shards:
#   python prepare.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-100BT
#   --val_tokens=10_000_000 \
#       --out_dir=data/fineweb_edu   (validation: 10M tokens, ten times what eval_tokens reads)
# Then: torchrun --standalone --nproc_per_node=8 train.py config/llama_1b3.py
dataset_dir = "data/fineweb_edu"
ckpt_dir = "out/llama_1b3"

# 4 sequences of 2048 tokens per GPU per micro-step; 2**19 = 524,288 tokens per optimizer update,
# reached by gradient accumulation: 64 micro-batches of 8,192 tokens, e.g. 64 micro-steps on one GPU
# or 8 on each of 8.
batch_size = 4
max_seq_len = 2048
tokens_per_update = 2**19

n_embd = 2048
n_heads = 32
n_kv_heads = 32
n_layers = 24
multiple_of = 256
eps = 1e-5
theta = 10_000.0
dropout = 0.0

schedule = "cosine"
warmup_iterations = 500
max_lr = 1e-4
min_lr = 1e-5
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.1
# The guide's AdamW. Muon, the CPU default, also trains under DDP and FSDP (each rank orthogonalizes
# its share of the matrices), but its learning rates were tuned on a 3M-parameter model and it has
# not been measured at this scale; try it with --optimizer=muon --muon_lr=... once a short run on
# your GPUs compares the two.
optimizer = "adamw"
grad_clip = 1.0

training_tokens = 45_000_000_000  # 85,830 updates
eval_interval = 32
eval_tokens = 2**20
token_ckpt = 1_000_000_000  # a checkpoint every billion tokens
model_gen_multiplier = 2.0
dtype = "auto"
compile = True
