"""
The library behind the scripts at the repository root: each module owns one idea.

  configurator  settings (globals, config files, --key=value, --help), user errors, devices, progress bars
  lm            the LM: finding and loading it, its tokenizer and table, the texts, perplexity
  spelling      a token's bytes, as the encoder reads them
  ngrams        which n-grams get a vector, and the least-squares solve of the vectors (train.py)
  storage       data and checkpoint files, and what each came from
  schedule      the learning rate, the budget and the batch order
  metrics       how close predicted rows are to the true ones
  e2e           the losses through the frozen LM: train_e2e.py's, and transfer.py's adaptation
  splice        predicted tables written, read back and spliced into the LM
  untrained     finding the rows an LM never trained
  filling       rows for added, repaired or repurposed tokens
  distill       Token Distillation: new tokens' rows fitted with the LM itself

The byte encoder itself is model.py at the root, as in nanoGPT.
"""
