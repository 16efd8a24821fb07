# nbgrader's settings for this course directory (run nbgrader from teacher/). The assignments, one per blanked
# notebook, are in source/, written by `make student` (scripts/student_copies.py): regenerate them, do not edit them.
# Grading, from this folder (README, "For teachers"):
#   nbgrader generate_assignment 07_lora    -> release/07_lora/07_lora.ipynb, the blank workbook (= student/07_lora.ipynb)
#   put each student's filled workbook at submitted/<student id>/07_lora/07_lora.ipynb, then
#   nbgrader autograde 07_lora              -> autograded/..., scores in gradebook.db (nbgrader export writes grades.csv)
c = get_config()  # noqa: F821 (nbgrader's config loader defines it)

c.CourseDirectory.course_id = "transfer-learning-notebooks"
# A notebook's training cells run for minutes on a CPU (nbgrader's default is 30 s a cell, then the cell fails).
c.Execute.timeout = 1800
# Every submission runs on the same kernel: the project's, where `helpers` and torch are installed (make nbgrader
# installs .venv's Python as the python3 kernel of nbgrader's venv).
c.Execute.kernel_name = "python3"
