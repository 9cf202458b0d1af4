"""The named special tokens of the unified vocabulary (see DESIGN.md, "The token stream").

They take the first ids of the vocabulary, in this order, in every tokenizer the project trains,
so `PAD_ID == 0` etc. hold everywhere and tests can rely on them.
"""
PAD = "<pad>"  # padding; never a training target
BOS = "<bos>"  # start of a sequence
EOS = "<eos>"  # end of a sequence
BOI = "<boi>"  # begin image: followed by exactly grid×grid image codes
EOI = "<eoi>"  # end image
BREAK = "<break>"  # CM3Leon's separator between retrieved documents and the main document
MASK = "<mask>"  # CM3 causal-masked objective: stands where a span was cut out ...
INFILL = "<infill>"  # ... and opens the span again at the end of the sequence
EOM = "<eom>"  # end of the infilled span

SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, BOI, EOI, BREAK, MASK, INFILL, EOM)
PAD_ID, BOS_ID, EOS_ID, BOI_ID, EOI_ID, BREAK_ID, MASK_ID, INFILL_ID, EOM_ID = range(len(SPECIAL_TOKENS))
