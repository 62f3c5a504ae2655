"""The paper's intranet (Figure 3), run as a principal runs it (issue 12, item 3).

``examples/intranet/run.sh`` runs ``python -m kh.intranet``: a principal ``corp1`` with the
credential file ``./corp1cred`` builds Figure 3 with the paper's own commands (khget, khdo, the
control channel, ``kh token``), checks every arrow of the figure, grows the storage and the
workers on demand while a worker keeps writing, reports and tears it all down.

- ``figure3``: the bring-up (GW, FS, DS and its disks, workers; another principal's node on
  the public domain to look in from);
- ``checks``: one line per arrow of the figure;
- ``growth``: khgetdisk, vgextend + lvextend + resize2fs, more workers, under a writer;
- ``outside``: a web server in the outside world (the external domain's uplink namespace);
- ``report``: the lines printed as it goes, and the report (text and JSON).
"""
