# The seed's story on Gemma 3 270M: two of its never-trained <unusedN> rows (1 and 2; the detector finds
# <unused0> trained a little: the LM repeats it at 1.2%) repurposed as the tags
# <code> and </code> around numpy's doctest examples, fine-tuned with the rows as shipped,
# the mean row, fvt and soft rows predicted from the tags' names (the encoder from
# `make demo CONFIG=config/gemma3_cpu.py`). Each method, both settings: about 20 minutes on 2 CPU cores,
# after the zero-shot table (about 100 s a method at zero_shot_chars=30000)
model = "gemma3"
out_dir = "out-gemma3"
name = "finetune-tags"
code_tags = True
rows_from = "config/gemma3_tags.json"
methods = "shipped,mean,fvt,soft"
# Gemma's 262,144-way head makes a step twice SmolLM2's: windows of 64 tokens keep 4 methods x 2 settings near 20 minutes
finetune_context = 64
zero_shot_chars = 30000  # Gemma's 262,144-way head makes each token about twice SmolLM2's
