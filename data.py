"""Data for tagalign: tokenizer, tag parser and vocabulary, the synthetic world, datasets.

(While the sections are written in parallel they live in data_*.py drafts, re-exported here;
they are merged into this one file before landing.)
"""
from data_tokenizer import *  # noqa: F401,F403  (draft: tokenizer section)
from data_tags import *  # noqa: F401,F403  (draft: tag parser section)
