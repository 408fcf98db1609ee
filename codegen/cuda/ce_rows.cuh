// ce_rows: placeholder, to be written
#pragma once
