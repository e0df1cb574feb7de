#![allow(clippy::unwrap_used)]
use nixvmm_tests::tier4;
use std::time::Duration;

#[test]
fn scratch() {
    let host = tier4::host().unwrap();
    let job = r#"
t() { date +%s.%N | cut -c7-14; }
n=/work/main/target/release/nixvmm
for i in 1 2 3; do echo "$(t) START"; $n run | head -c 10; echo; echo "$(t) END"; done
strace -f -r -T -o /tmp/st $n run > /dev/null
sort -k2 -n -r /tmp/st | head -25
"#;
    let log = host.run(job, Duration::from_secs(300)).unwrap();
    println!("{}", log.tail());
}
