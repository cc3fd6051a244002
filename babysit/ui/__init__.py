"""Streamlit pieces and pure figure builders used by app.py."""
