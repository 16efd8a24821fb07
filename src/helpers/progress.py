"""Progress bars that read well live and in a saved notebook: `tqdm`, a drop-in for `tqdm.auto.tqdm`.

A saved notebook cannot store a widget's state, so a code host shows a `tqdm.auto` bar as the text it was created
with, `0%|          | 0/50`, forever. Here the bar, when it closes, is replaced by plain text: its final line if
`leave=True` (the default), nothing if `leave=False`. In a terminal this is tqdm's ordinary text bar.
"""
from __future__ import annotations

from tqdm.auto import tqdm as _auto_tqdm
from tqdm.notebook import tqdm_notebook as _notebook_tqdm

if issubclass(_auto_tqdm, _notebook_tqdm):

    class tqdm(_auto_tqdm):  # noqa: N801 - the name every tqdm user expects
        """A notebook progress bar that leaves plain text, or nothing, when it closes (first shown in notebook 03)."""

        def __init__(self, *args, **kwargs):
            wanted = kwargs.pop("display", True)
            super().__init__(*args, display=False, **kwargs)
            self._handle = None
            if wanted and not self.disable and self.delay <= 0:
                from IPython.display import display

                self._handle = display(self.container, display_id=True)
                self.displayed = True

        def close(self) -> None:
            if self.disable:
                return
            finished_line = self.__str__() if self.leave else ""
            super().close()
            if self._handle is not None:
                self._handle.update({"text/plain": finished_line}, raw=True)
                self._handle = None

else:  # a terminal, or a kernel without ipywidgets: tqdm's own text bar already leaves readable lines
    tqdm = _auto_tqdm
