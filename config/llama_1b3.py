# The guide's 1.3B-parameter LLaMA-style run on FineWeb-Edu (45B tokens).
# Prepare the data first (needs a network):
#   python prepare.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT --out_dir=data/fineweb_edu
# Then: torchrun --standalone --nproc_per_node=8 train.py config/llama_1b3.py
dataset_dir = "data/fineweb_edu"
ckpt_dir = "out/llama_1b3"

# 4 sequences of 2048 tokens per GPU per micro-step; 2**19 = 524,288 tokens per optimizer update, reached by
# gradient accumulation (8 micro-steps of 65,536 tokens on 8 GPUs, 64 on one).
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
grad_clip = 1.0

training_tokens = 45_000_000_000  # 85,830 updates
eval_interval = 32
eval_tokens = 2**20
token_ckpt = 1_000_000_000  # a checkpoint every billion tokens
model_gen_multiplier = 2.0
dtype = "auto"
compile = True
