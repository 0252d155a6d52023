"""What the tests share. Importing any of it needs no root: the unit tier uses it too."""
