"""`make demo`, the whole system at CPU scale (tools/demo.py is its command line).

videos.py     the synthetic classes (one coloured square, one direction of motion per class)
tokenizer.py  the shipped tiny-s4 tokenizer with 1,000 codes: sha256 check, how to remake it
pipeline.py   the stages (each the tool a user would run) and their timings; DemoScale, QUICK
analysis.py   objective numbers: square colour and motion per clip
report.py     plots and numbers -> OUT/report/*.png, stats.json
markdown.py   OUT/report/report.md
"""
