"""The yardstick for bench/first_chart.py: the same figure in a bare `st.plotly_chart` page.

    streamlit run bench/apps/bare_chart.py -- --run-dir DIR

It draws exactly what the dashboard's chart draws (the figure of `babysit.ui.figures.build_figure`
on `babysit.ui.data.read_view`, whichever babysit is on the path), refreshed every second, and
nothing else: no status, no controls, no custom component.
"""

from __future__ import annotations

import argparse
import sys

import streamlit as st

from babysit.store import RunStore
from babysit.ui.data import read_view
from babysit.ui.figures import ChartOptions, build_figure

parser = argparse.ArgumentParser()
parser.add_argument("--run-dir", required=True)
args = parser.parse_known_args(sys.argv[1:])[0]
st.set_page_config(page_title="bare chart", layout="wide")
store = RunStore(args.run_dir)


@st.fragment(run_every=1.0)
def curve() -> None:
    status = store.status()
    st.plotly_chart(build_figure(read_view(store, status), ChartOptions()), key="curve")


curve()
