"""The Streamlit dashboard's code: finding and summarising runs (`run_index`), reading a run's
files (`data`) and probe studies (`study_files`), numbers (`analysis`), Plotly figures
(`figures`), tokens laid over the text (`tokens`) and coloured (`token_view`), and shared
widgets (`ui`).

It reads run directories through `poise_probe.rundir` only and never imports the trainer or a
model, so it runs without torch.
"""
