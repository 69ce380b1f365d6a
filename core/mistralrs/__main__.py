from mistralrs.cli import console_main

console_main()
