"""The Streamlit dashboard's code: reading runs (`data`), numbers (`analysis`), Plotly figures
(`figures`), token colouring (`tokens`) and shared widgets (`ui`).

It reads run directories through `poise_probe.rundir` only and never imports the trainer or a
model, so it runs without torch.
"""
