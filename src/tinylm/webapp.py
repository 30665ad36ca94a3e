"""Streamlit chat page for a tinylm checkpoint. Start it with `tinylm web CKPT` (127.0.0.1:8501).

The model is loaded once per server process (`st.cache_resource`); the history lives in the
browser session; replies stream through the same `LanguageModel.stream_chat` as every surface.
"""

from __future__ import annotations

import argparse

import streamlit as st

from tinylm.api import LanguageModel, load

EMPTY_REPLY = "*(the model ended its turn without a word)*"


@st.cache_resource(show_spinner="Loading the model...")
def get_model(checkpoint: str, device: str) -> LanguageModel:
    return load(checkpoint, device)


def sidebar(lm: LanguageModel) -> dict:
    d = lm.defaults
    with st.sidebar:
        st.header("Sampling")
        settings = {
            "temperature": st.slider("Temperature", 0.0, 2.0, float(d.temperature), 0.05, help="0 = always the most likely token"),
            "top_p": st.slider("Top-p", 0.0, 1.0, float(d.top_p), 0.05, help="1 = off; 0 = only the most likely token"),
            "top_k": st.slider("Top-k", 0, 200, int(d.top_k), 1, help="0 = off"),
            "max_new_tokens": st.slider("Max new tokens", 1, max(2, lm.context_length // 2), min(int(d.max_new_tokens), lm.context_length // 2)),
            "repetition_penalty": st.slider("Repetition penalty", 1.0, 2.0, float(d.repetition_penalty), 0.05),
        }
        if st.button("Clear history", type="primary"):
            st.session_state.messages = []
        st.caption(f"{lm.num_params:,} parameters · context {lm.context_length} tokens · tokenizer {lm.tokenizer.kind}")
    return settings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    st.set_page_config(page_title="tinylm chat", page_icon="💬")
    lm = get_model(args.checkpoint, args.device)
    st.title("tinylm chat")
    st.caption(f"Model **{lm.name}**, {lm.num_params / 1e6:.1f}M parameters")
    settings = sidebar(lm)

    messages = st.session_state.setdefault("messages", [])
    for m in messages:
        with st.chat_message(m["role"]):
            st.markdown(m["content"] or EMPTY_REPLY)

    if prompt := st.chat_input("Say something"):
        messages.append({"role": "user", "content": prompt})
        with st.chat_message("user"):
            st.markdown(prompt)
        history, dropped = lm.fit_messages(list(messages), settings["max_new_tokens"])
        if dropped:
            st.info(f"The conversation outgrew the {lm.context_length}-token context: the oldest {dropped} message(s) are left out.")
        with st.chat_message("assistant"):
            reply = st.write_stream(lm.stream_chat(history, **settings))
            reply = reply if isinstance(reply, str) else "".join(map(str, reply or []))
            if not reply.strip():
                st.markdown(EMPTY_REPLY)
        messages.append({"role": "assistant", "content": reply.strip()})


main()
